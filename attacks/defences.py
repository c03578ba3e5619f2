"""Three training-set sanitisation defences, each measured by retraining the head.

Run on the poisoned training set a job is evaluated on: the clean features
f(mu) (N_c, d) and the poison features f(nu) (N_p, d), with labels. Each
defence flags points, the flagged points are removed, and the linear head is
retrained with the one recipe and the job's seed on what remains
(:func:`attacks.head.train_head`); the test accuracy of that head is reported
beside how many poisons and how many clean points were removed.

1. ``linf`` -- the L_inf magnitude-anomaly filter of the paper's Table 3 (feature
   matching-r): a poison is removed when any of its pixels lies outside
   [lo - m (hi - lo), hi + m (hi - lo)], [lo, hi] being the clean training set's pixel
   range and m = ``linf_margin`` (0.5: a magnitude half the range beyond it). It needs pixels, so it applies to input-space poisons only (for
   feature-space poisons, e.g. ``gc_feature``, it reports
   ``{"applicable": False, "reason": ...}``). Clean images are inside the range
   by definition, so it never removes one.
2. ``knn`` -- k-nearest-neighbour label consistency (Peri et al., "Deep k-NN
   Defense against Clean-label Data Poisoning Attacks", 2020), in feature space:
   a point is removed when the plurality label among its k nearest neighbours
   (Euclidean, among the whole poisoned training set, itself excluded) is not
   its own label. A tie that includes its own label keeps it. Distances come
   from a chunked GEMM, ||a||^2 - 2 a.b + ||b||^2, in float32: peak memory is
   ``chunk_elements`` floats, not N^2.
3. ``spectral`` -- spectral signatures (Tran, Li, Madry, NeurIPS 2018): per
   class, centre the features, take the top right singular vector v of the
   centred matrix, score each point by its squared projection on v, and remove
   the highest-scoring points of that class.

   Removal budget rule [decision]: each class c of n_c points loses
   ``min(round(spectral_budget * fraction * n_c), floor(max_remove_fraction * n_c))``
   points, where ``fraction`` is the expected poison fraction of the training
   set (``spectral_fraction``; None: the actual N_p / (N_c + N_p), i.e. the
   defender is told the poisoning rate, as in Tran et al., who remove 1.5 eps)
   and ``spectral_budget`` is Tran et al.'s 1.5. Poisons here keep the labels
   of their base images and so spread over all classes; the defender does not
   know the split, so the same fraction applies to every class.

Parameters (:class:`DefenceConfig`): knn_k (10, >= 1), spectral_budget (1.5, > 0),
spectral_fraction (None or in (0, 1]), max_remove_fraction (0.5, in (0, 1)),
linf_margin (0.5, >= 0, relative to the clean range), chunk_elements (2^24, >= 1).

Shapes: Z_clean (N_c, d), y_clean (N_c,), Z_poison (N_p, d), y_poison (N_p,),
poisons (N_p, C, H, W) or None. Flags are (N_c + N_p,) bool, clean points first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from attacks.catalogue import HeadRecipe
from attacks.feature_matching_r import anomaly_mask
from attacks.head import accuracy, feature_scale, train_head
from attacks.progress import checkpoint

__all__ = ["DefenceConfig", "DEFENCES", "knn_flags", "linf_flags", "run_defences", "spectral_flags", "spectral_quota"]

DEFENCES = ("linf", "knn", "spectral")


@dataclass(frozen=True)
class DefenceConfig:
    """Parameters of the three defences (see the module docstring)."""

    knn_k: int = 10
    spectral_budget: float = 1.5
    spectral_fraction: float | None = None
    max_remove_fraction: float = 0.5
    linf_margin: float = 0.5
    chunk_elements: int = 1 << 24

    def __post_init__(self) -> None:
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
        if not self.spectral_budget > 0:
            raise ValueError(f"spectral_budget must be > 0, got {self.spectral_budget}")
        if self.spectral_fraction is not None and not 0 < self.spectral_fraction <= 1:
            raise ValueError(f"spectral_fraction must be in (0, 1] or None, got {self.spectral_fraction}")
        if not 0 < self.max_remove_fraction < 1:
            raise ValueError(f"max_remove_fraction must be in (0, 1), got {self.max_remove_fraction}")
        if not self.linf_margin >= 0:
            raise ValueError(f"linf_margin must be >= 0, got {self.linf_margin}")
        if self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {self.chunk_elements}")


def linf_flags(poisons: torch.Tensor, lo: float, hi: float, margin: float = 0.5) -> torch.Tensor:
    """(N_p,) bool: poisons with a pixel outside [lo - margin (hi - lo), hi + margin (hi - lo)]
    (feature matching-r's magnitude-anomaly rule)."""
    if poisons.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=poisons.device)
    return anomaly_mask(poisons, lo, hi, margin)


@torch.no_grad()
def knn_flags(Z: torch.Tensor, y: torch.Tensor, k: int = 10, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """(N,) bool: points whose k nearest neighbours' plurality label is not their own.

    Neighbours are among all N points, the point itself excluded (k is capped at
    N - 1). Ties for the plurality that include the point's own label keep it."""
    n = Z.shape[0]
    flags = torch.zeros(n, dtype=torch.bool, device=Z.device)
    k = min(k, n - 1)
    if k < 1:
        return flags
    Z = Z.float()
    y = y.long()
    K = int(y.max().item()) + 1
    sq = (Z * Z).sum(1)
    rows = max(1, min(n, chunk_elements // n))
    for i in range(0, n, rows):
        checkpoint()
        j = min(i + rows, n)
        D = torch.addmm(sq[None, :], Z[i:j], Z.T, beta=1.0, alpha=-2.0)  # (c, N) = -2 a.b + ||b||^2
        D += sq[i:j, None]
        D[torch.arange(j - i, device=Z.device), torch.arange(i, j, device=Z.device)] = math.inf
        idx = D.topk(k, dim=1, largest=False).indices
        counts = torch.zeros(j - i, K, device=Z.device).scatter_add_(1, y[idx], torch.ones(j - i, k, device=Z.device))
        own = counts.gather(1, y[i:j, None]).squeeze(1)
        flags[i:j] = counts.amax(1) > own
    return flags


def spectral_quota(n_c: int, fraction: float, budget: float = 1.5, max_remove_fraction: float = 0.5) -> int:
    """How many points of a class of n_c the spectral filter removes (the budget rule)."""
    return int(min(round(budget * fraction * n_c), math.floor(max_remove_fraction * n_c)))


@torch.no_grad()
def spectral_scores(Z: torch.Tensor) -> torch.Tensor:
    """(n,) squared projections of the centred rows of Z on its top right singular vector.

    Computed in float64 from the smaller Gram matrix (n x n or d x d) by eigh:
    deterministic, and the sign of the singular vector does not matter once squared."""
    n, d = Z.shape
    if n < 2:
        return torch.zeros(n, dtype=torch.float64, device=Z.device)
    X = Z.double() - Z.double().mean(0, keepdim=True)
    if n <= d:
        evals, evecs = torch.linalg.eigh(X @ X.T)  # X X^T u = s^2 u; X v = s u
        return evals[-1].clamp_min(0) * evecs[:, -1] ** 2
    evals, evecs = torch.linalg.eigh(X.T @ X)
    return (X @ evecs[:, -1]) ** 2


@torch.no_grad()
def spectral_flags(
    Z: torch.Tensor, y: torch.Tensor, fraction: float, budget: float = 1.5, max_remove_fraction: float = 0.5
) -> torch.Tensor:
    """(N,) bool: per class, the spectral_quota(n_c, ...) points with the largest spectral score."""
    flags = torch.zeros(Z.shape[0], dtype=torch.bool, device=Z.device)
    for c in torch.unique(y).tolist():
        checkpoint()
        members = (y == c).nonzero().squeeze(1)
        m = spectral_quota(members.numel(), fraction, budget, max_remove_fraction)
        if m == 0:
            continue
        scores = spectral_scores(Z[members])
        flags[members[scores.topk(m).indices]] = True
    return flags


def run_defences(
    Z_clean: torch.Tensor,
    y_clean: torch.Tensor,
    Z_poison: torch.Tensor,
    y_poison: torch.Tensor,
    Z_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    recipe: HeadRecipe | None = None,
    seed: int = 0,
    *,
    poisons: torch.Tensor | None = None,
    clean_range: tuple[float, float] | None = None,
    config: DefenceConfig | None = None,
    undefended_accuracy: float | None = None,
    progress: Callable[[str, float], None] | None = None,
    scale: float | None = None,
) -> dict:
    """Run the three defences and return ``{name: result}``.

    Each applicable result: accuracy (test accuracy of the head retrained on the
    kept points), poisons_removed, clean_removed, n_poisons, n_clean, n_kept, and
    the defence's parameters. ``linf`` without pixels (``poisons`` None) is
    ``{"applicable": False, "reason": ...}``. When a defence removes nothing the
    training set is unchanged, so ``undefended_accuracy`` (if given) is reported
    instead of refitting the same head. ``scale``: the clean feature scale that fixes the
    victim's L2 strength (:func:`attacks.head.fit_head`); default that of ``Z_clean``.
    """
    config = config or DefenceConfig()
    report = progress or (lambda s, f: None)
    n_c, n_p = int(Z_clean.shape[0]), int(Z_poison.shape[0])
    dev = Z_clean.device
    Z = torch.cat([Z_clean.float(), Z_poison.float().to(dev)])
    y = torch.cat([y_clean.long(), y_poison.long().to(dev)])
    s = scale if scale is not None else feature_scale(Z_clean.float())

    def measure(flags: torch.Tensor, params: dict) -> dict:
        keep = ~flags
        removed_p = int(flags[n_c:].sum())
        removed_c = int(flags[:n_c].sum())
        if removed_p + removed_c == 0 and undefended_accuracy is not None:
            acc = float(undefended_accuracy)
        else:
            head = train_head(Z[keep], y[keep], num_classes, recipe, seed, scale=s)
            acc = accuracy(head, Z_test, y_test)
        return {"applicable": True, "accuracy": acc, "poisons_removed": removed_p, "clean_removed": removed_c,
                "n_poisons": n_p, "n_clean": n_c, "n_kept": int(keep.sum()), "params": params}

    out: dict[str, dict] = {}
    if poisons is None:
        out["linf"] = {"applicable": False,
                       "reason": "feature-space poisons have no pixels: the L_inf filter needs images"}
    else:
        if clean_range is None:
            raise ValueError("the L_inf filter needs the clean pixel range (lo, hi)")
        lo, hi = clean_range
        flags = torch.zeros(n_c + n_p, dtype=torch.bool, device=dev)
        flags[n_c:] = linf_flags(poisons, lo, hi, config.linf_margin).to(dev)
        out["linf"] = measure(flags, {"margin": config.linf_margin, "clean_range": [lo, hi]})
        out["linf"]["removed_fraction"] = out["linf"]["poisons_removed"] / max(n_p, 1)
    report("defences", 1 / 3)
    flags = knn_flags(Z, y, config.knn_k, config.chunk_elements)
    out["knn"] = measure(flags, {"k": min(config.knn_k, max(n_c + n_p - 1, 0))})
    report("defences", 2 / 3)
    fraction = config.spectral_fraction if config.spectral_fraction is not None else n_p / max(n_c + n_p, 1)
    flags = spectral_flags(Z, y, fraction, config.spectral_budget, config.max_remove_fraction)
    out["spectral"] = measure(flags, {"expected_fraction": fraction, "budget": config.spectral_budget,
                                      "max_remove_fraction": config.max_remove_fraction})
    report("defences", 1.0)
    return out
