"""Feature matching-r: feature matching, then the L_inf anomaly filter.

Paper: Lu, Yang, Kamath, Yu (SaTML 2024), Table 3 -- a simple sanitisation
defence: poisons whose L_inf magnitude leaves the clean data range are removed
before evaluation (the paper removed 181 and 274 of 1,500 poisons at beta 0.25
and 0.1 in transfer learning).

Parameters (:class:`attacks.catalogue.FeatureMatchingRParams`): those of
feature matching, plus anomaly_margin (float, 0.5, >= 0): a magnitude-anomaly rule.
A poison is an anomaly when its L_inf magnitude leaves the clean range by more than
``anomaly_margin`` times the range's width, i.e. a pixel lies outside
[lo - m (hi - lo), hi + m (hi - lo)], [lo, hi] being the minimum and maximum pixel
value of the clean training set. The paper's anomalies are poisons of several times
the normal magnitude (its Figure 6; 12-18% of the poisons); a margin of 0 would flag a
poison one rounding error outside [lo, hi] and remove every unclipped poison [D].
The removed fraction is reported (``anomaly_fraction``).

Shapes: as feature matching, with the anomalies removed (n_kept <= n).
"""

from __future__ import annotations

import torch

from attacks.catalogue import FeatureMatchingRParams
from attacks.feature_matching import feature_matching


def anomaly_mask(poisons: torch.Tensor, lo: float, hi: float, margin: float = 0.5) -> torch.Tensor:
    """True for each poison with a pixel outside [lo - margin (hi - lo), hi + margin (hi - lo)]."""
    flat = poisons.reshape(poisons.shape[0], -1)
    pad = margin * (hi - lo)
    return (flat.amax(1) > hi + pad) | (flat.amin(1) < lo - pad)


def run(ctx, params: FeatureMatchingRParams, *, epsilon: float, beta: float, seed: int, progress=None):
    """Entry point: feature matching with the anomalous poisons filtered out."""
    from attacks.pipeline import AttackOutput

    out = feature_matching(ctx, params, epsilon=epsilon, beta=beta, seed=seed, progress=progress)
    x = ctx.dataset.x_train
    lo, hi = float(x.min()), float(x.max())
    bad = anomaly_mask(out["poisons"], lo, hi, params.anomaly_margin)
    keep = ~bad
    out["extra"] |= {"anomalies_removed": int(bad.sum()), "n_poisons_generated": int(bad.numel()),
                     "anomaly_fraction": float(bad.float().mean()) if bad.numel() else 0.0,
                     "anomaly_margin": params.anomaly_margin}
    out["poisons"] = out["poisons"][keep]
    out["poison_labels"] = out["poison_labels"][keep]
    out["base_index"] = out["base_index"][keep]
    out["zeta"] = out["zeta"][keep]
    return AttackOutput(**out)
