"""What decoder inversion must show on real data (issue #4), with the project's own SimCLR
small_cnn pre-trained on mnist5k (seed 0). Slow: run in CI, with -s to see the numbers.

- the poisons lie inside the clean data range;
- the decoder reconstructs held-out clean test images with SSIM >= 0.8.
The accuracy drop at eps 0.03 and ||f(nu) - zeta||^2 are printed and recorded, not asserted
beyond sanity (the paper saw the matching error stay large, ~150 on its encoders).
"""

from __future__ import annotations

import pytest
import torch

from attacks.features import FeatureCache
from attacks.pipeline import run_job

pytestmark = pytest.mark.slow

# One epoch at a higher learning rate than the default (30 epochs at 1e-3) keeps the test in CI
# time; measured here it already reconstructs held-out digits with SSIM ~0.98.
DECODER = {"decoder_width": 32, "decoder_epochs": 1, "decoder_lr": 3e-3, "decoder_batch_size": 128}


def test_decoder_inversion_poisons_in_range_and_decoder_reconstructs(simclr_mnist, mnist5k):
    r = run_job(encoder=simclr_mnist, dataset=mnist5k, attack="decoder_inversion", epsilon=0.03, params=DECODER,
                device="cpu", seed=0, cache=FeatureCache())
    m, p = r.metrics, r.poisons
    ps = m["poison_stats"]
    print(
        f"\ndecoder_inversion eps=0.03: clean {m['clean_accuracy']:.4f} target {m['target_accuracy']:.4f} "
        f"poisoned {m['poisoned_accuracy']:.4f} drop {m['drop']:.4f} | decoder test SSIM "
        f"{m['decoder_test_ssim']:.4f} L1 {m['decoder_test_l1']:.4f} ({m['decoder_loss_used']}, "
        f"{m['decoder_train_seconds']:.0f} s) | ||f(nu)-zeta||^2 mean {ps['feature_match_error']['mean']:.2f} "
        f"median {ps['feature_match_error']['median']:.2f} vs ||f(mu')-zeta||^2 {m['base_feature_error_mean']:.2f}, "
        f"||zeta|| {ps['zeta_norm']['mean']:.2f} | l2_to_base {ps['l2_to_base']['mean']:.3f} "
        f"| seconds {m['stage_seconds']['total']:.0f}"
    )
    assert m["n_poisons"] == 120 and len(p) == 120
    lo, hi = float(mnist5k.x_train.min()), float(mnist5k.x_train.max())
    assert p.x.min() >= lo and p.x.max() <= hi and ps["fraction_outside_clean_range"] == 0
    assert torch.equal(p.y, mnist5k.y_train[p.base_index])  # clean-label
    assert m["decoder_test_images"] == 1000 and m["decoder_from_cache"] is False
    assert m["decoder_test_ssim"] >= 0.8
    assert m["target_accuracy"] < m["clean_accuracy"]
    assert m["poisoned_accuracy"] >= m["target_accuracy"] - 0.05  # no stronger than the target it aims at
