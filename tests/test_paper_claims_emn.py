"""What unlearnable examples must show (issue #4), with the project's own SimCLR small_cnn
pre-trained on mnist5k (the session fixture) applied to the built-in digits (transfer).

The paper (Table 4): EMN on a frozen encoder drops accuracy much less than end-to-end
training from the same pre-trained weights (FT 89.71 -> 82.16 frozen vs 95.22 -> 68.79
end-to-end). Slow: minutes, run in CI; the measured numbers are printed (run with -s).

Budget [D]: digits (8x8, 500 training images, the full 360-image test set) keeps the
input-gradient passes cheap enough for CI. Each round runs 10 sign-PGD steps of 1.6/255
instead of the reference's 20 of 0.8/255: the same distance travelled per round
(16/255, twice the 8/255 radius, so every pixel can cross the ball), at half the cost.
At most 5 rounds for both variants, the same noise budget; the end-to-end evaluation
fine-tunes for 15 epochs (60 SGD steps), enough for its clean run to converge.
"""

from __future__ import annotations

import pytest

from attacks.data import load_dataset
from attacks.pipeline import run_job

pytestmark = pytest.mark.slow

COMMON = {"pgd_steps": 10, "pgd_step": 1.6 / 255, "max_rounds": 5}


def _run(enc, ds, params):
    r = run_job(encoder=enc, dataset=ds, attack="emn", epsilon=1.0, params=params, device="cpu", seed=0)
    m = r.metrics
    print(
        f"\nemn end_to_end={m['end_to_end']}: clean {m['clean_accuracy']:.4f} poisoned {m['poisoned_accuracy']:.4f} "
        f"drop {m['drop']:.4f} rounds {m['rounds']} stop {m['stop_reached']} "
        f"train_acc(x+delta) {m['train_accuracy_perturbed']:.4f} loss clean {m['loss_clean']:.4f} "
        f"perturbed {m['loss_perturbed']:.4f} linf {m['poison_stats']['linf_to_base']['max'] * 255:.2f}/255 "
        f"seconds {m['stage_seconds']['total']:.0f}"
    )
    return m


@pytest.fixture(scope="module")
def results(simclr_mnist):
    ds = load_dataset("digits", max_train=500, max_test=360)
    frozen = _run(simclr_mnist, ds, COMMON)
    e2e = _run(simclr_mnist, ds, {**COMMON, "end_to_end": True, "finetune_epochs": 15})
    return frozen, e2e


def test_emn_runs_on_a_pretrained_encoder(results):
    frozen, e2e = results
    for m in (frozen, e2e):
        assert m["n_poisons"] == 500
        assert m["poison_stats"]["linf_to_base"]["max"] <= 8 / 255 + 1e-6
        assert m["loss_perturbed"] < m["loss_clean"]  # the noise is error-minimising for its model
        assert m["clean_accuracy"] > 0.7  # both victims learn the clean task
    assert e2e["evaluated_by"] == "attack" and "evaluated_by" not in frozen


# Measured (seed 0, this file's settings, CPU): frozen 93.33 -> 89.72 (drop 3.6 points, 5 rounds,
# train accuracy on x+delta 0.88); end-to-end 98.06 -> 97.50 (drop 0.6 points; stop_accuracy reached
# at round 4, the pre-trained model already fits the clean images: CE 0.048 clean vs 0.014 perturbed).
# The paper's ordering is NOT reproduced here: the pre-trained encoder fits digits before the noise
# becomes a shortcut. Strict: once the attack or the setting shows the claim, this XPASSes and fails,
# so the marker must be removed.
@pytest.mark.xfail(strict=True, reason="not reproduced at this scale: frozen drop 3.6 > end-to-end drop 0.6 points")
def test_emn_frozen_encoder_drops_less_than_end_to_end(results):
    frozen, e2e = results
    assert frozen["drop"] < e2e["drop"], (frozen["drop"], e2e["drop"])
