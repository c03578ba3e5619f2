"""tgda_input at the catalogue's defaults on digits, with and without constraints (issue #12).

A standalone script (not one of ``python -m bench``'s benchmarks): a SimCLR small_cnn (width 16,
2 epochs, seed 0) pre-trained here, then tgda_input at one epsilon for each seed, printing the
drop in points, the poisons' mean L_inf / L2 distance to their bases and the strength the
attack records (leader steps, validation losses, follower gradient), then the means over seeds.

    PYTHONPATH=. python bench/tgda_defaults.py [EPSILON [PARAMS_JSON [SEEDS [VARIANTS]]]]
    e.g. PYTHONPATH=. python bench/tgda_defaults.py 0.1 '{}' 0,1,2 True,False
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from attacks.data import load_dataset
from attacks.encoders import EncoderSpec
from attacks.features import FeatureCache
from attacks.pipeline import run_job
from attacks.pretrain import SimCLRConfig, pretrain_simclr
from attacks.stage_cache import StageCache


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    eps = float(argv[0]) if len(argv) > 0 else 0.1
    extra = json.loads(argv[1]) if len(argv) > 1 else {}
    seeds = [int(s) for s in argv[2].split(",")] if len(argv) > 2 else [0, 1, 2]
    variants = argv[3].split(",") if len(argv) > 3 else ["True", "False"]
    ds = load_dataset("digits")
    enc = pretrain_simclr(EncoderSpec(arch="small_cnn", in_channels=1, width=16), ds.x_train,
                          SimCLRConfig(epochs=2, batch_size=128, seed=0, device="cpu"))
    cache, stages = FeatureCache(), StageCache()
    for con in variants:
        drops, linf, l2 = [], [], []
        for s in seeds:
            t0 = time.perf_counter()
            m = run_job(encoder=enc, dataset=ds, attack="tgda_input", epsilon=eps,
                        params={"constrained": con == "True", **extra}, device="cpu", seed=s, cache=cache,
                        stage_cache=stages, defences=False).metrics
            ps = m["poison_stats"]
            drops.append(100 * m["drop"])
            linf.append(ps["linf_to_base"]["mean"])
            l2.append(ps["l2_to_base"]["mean"])
            strength = {k: m[k] for k in m if k.startswith(("tgda", "val_loss"))}
            print(f"constrained={con} seed={s}: clean {m['clean_accuracy']:.4f} poisoned {m['poisoned_accuracy']:.4f} "
                  f"drop {drops[-1]:.2f} linf_to_base {linf[-1]:.4f} l2_to_base {l2[-1]:.4f} "
                  f"outside {ps['fraction_outside_clean_range']:.3f} {strength} "
                  f"defender_val_accuracy {m.get('defender_val_accuracy')} {time.perf_counter() - t0:.1f}s", flush=True)
        print(f"== constrained={con} eps={eps} {extra}: drop mean {statistics.mean(drops):.2f} "
              f"{[round(d, 2) for d in drops]} linf_to_base {statistics.mean(linf):.4f} "
              f"l2_to_base {statistics.mean(l2):.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
