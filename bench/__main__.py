"""Run the benchmarks: `python -m bench [--device cpu|cuda] [--quick] [NAME ...]`."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = ["gc_feature", "evaluation", "input_space"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("names", nargs="*", choices=BENCHES + [[]], help=f"default: all of {BENCHES}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes only")
    args = p.parse_args(argv)
    for name in args.names or BENCHES:
        print(f"\n== {name} ==")
        importlib.import_module(f"bench.{name}").run(device=args.device, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
