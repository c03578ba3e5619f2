"""Run the benchmarks: `python -m bench [--device cpu|cuda] [--quick] [--full-loop] [--jobs N] [--only LABEL ...] [NAME ...]`."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

BENCHES = ["gc_feature", "evaluation", "fm_throughput", "extraction", "memory", "load", "input_space", "strength",
           "soak"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("names", nargs="*", choices=BENCHES + [[]], help=f"default: all of {BENCHES}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--full-loop", action="store_true",
                   help="evaluation: run the encoder-in-the-loop side for all 100 epochs on the CPU too")
    p.add_argument("--jobs", type=int, default=None, help="soak: jobs in the burst (default 200; 20 with --quick)")
    p.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                   help="strength: only the rows whose label contains one of these words")
    args = p.parse_args(argv)
    for name in args.names or BENCHES:
        print(f"\n== {name} ==", flush=True)
        run = importlib.import_module(f"bench.{name}").run
        kwargs = dict(device=args.device, quick=args.quick)
        if "full_loop" in inspect.signature(run).parameters:
            kwargs["full_loop"] = args.full_loop
        if "jobs" in inspect.signature(run).parameters:
            kwargs["jobs"] = args.jobs
        if "only" in inspect.signature(run).parameters:
            kwargs["only"] = args.only
        run(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
