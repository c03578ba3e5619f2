"""What unlearnable examples must show (issue #4), with the project's own SimCLR small_cnn
pre-trained on mnist5k (the session fixture), attacked on mnist5k itself: the paper's "FT"
setting (an encoder pre-trained on the dataset it is then trained on).

The paper (Table 4): EMN on a frozen encoder drops accuracy much less than end-to-end
training from the same pre-trained weights (FT 89.71 -> 82.16 frozen vs 95.22 -> 68.79
end-to-end). Slow: about 80 s, run in CI; the measured numbers are printed (run with -s).

Budget [D]: 1,000 training images of mnist5k (28x28) and 1,000 test images. Each round runs 10
sign-PGD steps of 1.6/255 instead of the reference's 20 of 0.8/255: the same distance travelled
per round (16/255, twice the 8/255 radius, so every pixel can cross the ball), at half the cost.
At most 5 rounds for both variants, the same noise budget; the end-to-end evaluation fine-tunes
for 30 epochs (240 SGD steps), enough for its clean run to reach the frozen probe's accuracy.

In the transfer setting this file used before (the mnist5k encoder on 8x8 digits, upsampled)
the ordering did not hold (frozen 3.6 points, end-to-end 0.6): the pre-trained encoder fits
64-pixel digits from their content before noise on 64 pixels becomes a shortcut.
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
    ds = load_dataset("mnist5k", max_train=1000, max_test=1000)
    frozen = _run(simclr_mnist, ds, COMMON)
    e2e = _run(simclr_mnist, ds, {**COMMON, "end_to_end": True, "finetune_epochs": 30})
    return frozen, e2e


def test_emn_runs_on_a_pretrained_encoder(results):
    frozen, e2e = results
    for m in (frozen, e2e):
        assert m["n_poisons"] == 1000
        assert m["poison_stats"]["linf_to_base"]["max"] <= 8 / 255 + 1e-6
        assert m["loss_perturbed"] < m["loss_clean"]  # the noise is error-minimising for its model
        assert m["clean_accuracy"] > 0.85  # both victims learn the clean task (measured 0.916, 0.927)
    assert e2e["evaluated_by"] == "attack" and "evaluated_by" not in frozen


# Measured (seed 0, this file's settings, CPU): frozen 91.6 -> 86.7 (drop 4.9 points, 5 rounds,
# train accuracy on x+delta 0.69); end-to-end 92.7 -> 31.7 (drop 61.0 points, train accuracy of the
# attack's model on x+delta 0.38). With 500 images: 5.7 vs 58.1 (40 fine-tuning epochs).
def test_emn_frozen_encoder_drops_less_than_end_to_end(results):
    frozen, e2e = results
    assert frozen["drop"] < e2e["drop"], (frozen["drop"], e2e["drop"])
    assert frozen["drop"] < 0.15 and e2e["drop"] > 0.3  # the paper: 7.6 vs 26.4 points
