"""Figures for job and audit reports, as PNG bytes (matplotlib, Agg backend, no display).

* :func:`examples_figure` -- clean images beside their poisons and the
  perturbation between them (the paper's Figs 2, 5, 9): three rows, clean /
  poison / poison - clean, a few columns; the perturbation in a diverging
  colormap centred on 0, each panel on its own symmetric scale (its max |δ| in
  its title), a poison identical to its base marked as such in its panel.
  1- or 3-channel images of any size;
  for 3 channels the perturbation shown is the channel mean (signed), and the
  images are clipped to the display range (the title says how many pixels were).
* :func:`linf_histogram` -- the poisons' L_inf magnitude (max |pixel| per
  image) against the clean range (the paper's Fig 6): a histogram with
  vertical lines at the clean range's ends, optionally the clean images'
  magnitudes behind it.
* :func:`drop_vs_epsilon` -- for an audit: accuracy drop against epsilon, one
  line per attack row with the spread over seeds as error bars.

Every function returns PNG bytes and is deterministic: same input, same bytes
(fixed size and dpi, no timestamps in the PNG metadata). Inputs are tensors or
arrays and are not modified.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

__all__ = ["build_examples_figure", "drop_vs_epsilon", "examples_figure", "linf_histogram"]

_DPI = 100


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _hwc(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) for one channel, (H, W, C) otherwise."""
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def examples_figure(
    clean, poisons, *, n: int = 6, clean_range: tuple[float, float] | None = None, title: str | None = None
) -> bytes:
    """Rows clean / poison / perturbation for the first ``n`` pairs, as PNG bytes.

    clean, poisons: (N, C, H, W) with C in {1, 3}, the i-th poison made from the
    i-th clean image (pass ``x_train[base_index]``). clean_range: the display
    range (default: the clean images' min and max). See :func:`build_examples_figure`."""
    return _png(build_examples_figure(clean, poisons, n=n, clean_range=clean_range, title=title))


ZERO_TEXT = "identical to base\n(max |δ| = 0)"


def build_examples_figure(
    clean, poisons, *, n: int = 6, clean_range: tuple[float, float] | None = None, title: str | None = None
):
    """The matplotlib Figure of :func:`examples_figure` (the caller closes it, or passes it to ``_png``).

    Each perturbation panel has its own symmetric colour scale, ±(max |δ| of that panel), and
    that value in its title, so that a small perturbation beside a large one is still visible.
    A poison equal to its base (δ = 0 everywhere) gets no colour map but a centred
    :data:`ZERO_TEXT`; a 3-channel δ whose channel mean is 0 though δ is not says that instead."""
    clean, poisons = _numpy(clean), _numpy(poisons)
    if clean.shape != poisons.shape or clean.ndim != 4 or clean.shape[1] not in (1, 3):
        raise ValueError(f"clean and poisons must both be (N, 1|3, H, W); got {clean.shape} and {poisons.shape}")
    m = min(n, clean.shape[0])
    if m == 0:
        return _message("no poisons to show")
    clean, poisons = clean[:m], poisons[:m]
    lo, hi = clean_range if clean_range is not None else (float(clean.min()), float(clean.max()))
    if hi <= lo:
        hi = lo + 1.0
    full = poisons - clean  # (m, C, H, W)
    delta = full.mean(1)  # (m, H, W): signed, the channel mean, what is drawn
    clipped = int(((poisons < lo) | (poisons > hi)).sum())
    gray = clean.shape[1] == 1

    def show(ax, img):
        if gray:
            ax.imshow(_hwc(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        else:
            ax.imshow(np.clip((_hwc(img) - lo) / (hi - lo), 0, 1), interpolation="nearest")

    col = 1.6
    fig, axes = plt.subplots(3, m, figsize=(col * m + 1.2, col * 3 + 0.9), squeeze=False,
                             gridspec_kw={"wspace": 0.05, "hspace": 0.3})
    zero = 0
    for j in range(m):
        show(axes[0, j], clean[j])
        show(axes[1, j], poisons[j])
        ax = axes[2, j]
        linf = float(np.abs(full[j]).max())
        bound = float(np.abs(delta[j]).max())
        if not (math.isfinite(linf) and math.isfinite(bound)):
            _panel_text(ax, delta[j].shape, "non-finite\nperturbation")
            ax.set_title("max |δ| = ?", fontsize=8)
        elif linf == 0.0:
            zero += 1
            _panel_text(ax, delta[j].shape, ZERO_TEXT)
            ax.set_title("max |δ| = 0", fontsize=8)
        elif bound <= 1e-6 * linf:  # channels that cancel (to rounding): nothing to draw
            _panel_text(ax, delta[j].shape, f"channel mean 0\n(max |δ| = {linf:.3g})")
            ax.set_title(f"max |δ| = {linf:.3g}", fontsize=8)
        else:
            ax.imshow(delta[j], cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
            head = f"max |δ| = {linf:.3g}"
            if not gray and f"{bound:.3g}" != f"{linf:.3g}":  # the channel mean drawn spans less
                head += f"\nmean ±{bound:.3g}"
            ax.set_title(head, fontsize=8)
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, label in enumerate(("clean", "poison", "poison - clean" + ("" if gray else "\n(channel mean)"))):
        axes[i, 0].set_ylabel(label)
    scale = ScalarMappable(norm=Normalize(-1.0, 1.0), cmap="RdBu_r")
    bar = fig.colorbar(scale, ax=axes[2, :].tolist(), fraction=0.046, pad=0.02,
                       label="δ / panel max |δ|")
    bar.set_ticks([-1.0, 0.0, 1.0])
    bar.set_ticklabels(["-max", "0", "+max"])
    head = title or "clean images, their poisons, and the perturbation"
    if zero:
        head += f"\n{zero} of {m} poisons shown are identical to their base"
    if clipped:
        head += f"\n{clipped} poison pixels outside [{lo:.3g}, {hi:.3g}] clipped for display"
    fig.suptitle(head, fontsize=10)
    return fig


def _panel_text(ax, shape: tuple[int, int], text: str) -> None:
    """A panel with no colour map: a light background of the image's size and centred text."""
    ax.imshow(np.zeros(shape, np.float32), cmap="gray", vmin=-1.0, vmax=0.1, interpolation="nearest")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, transform=ax.transAxes, color="0.15")


def linf_histogram(
    poisons, clean_range: tuple[float, float], *, clean=None, bins: int = 30, title: str | None = None
) -> bytes:
    """Histogram of max |pixel| per poison, with vertical lines at the clean range [lo, hi].

    poisons: (N, ...) images; clean: optional (M, ...) clean images, drawn behind."""
    p = _numpy(poisons)
    lo, hi = float(clean_range[0]), float(clean_range[1])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if p.shape[0] == 0:
        plt.close(fig)
        return _message_figure("no poisons to show")
    mags = np.abs(p.reshape(p.shape[0], -1)).max(1)
    values = [mags]
    if clean is not None:
        c = _numpy(clean)
        cmags = np.abs(c.reshape(c.shape[0], -1)).max(1) if c.shape[0] else np.zeros(0, np.float32)
        values.append(cmags)
    else:
        cmags = None
    top = max(float(v.max()) for v in values if v.size) if any(v.size for v in values) else hi
    left = min(0.0, lo)
    right = max(top, hi) * 1.05 + 1e-6
    edges = np.linspace(left, right, bins + 1)
    if cmags is not None and cmags.size:
        ax.hist(cmags, bins=edges, color="0.75", label=f"clean images (n={cmags.size})")
    ax.hist(mags, bins=edges, color="tab:red", alpha=0.8, label=f"poisons (n={mags.size})")
    ax.axvline(lo, color="k", linestyle="--", linewidth=1)
    ax.axvline(hi, color="k", linestyle="--", linewidth=1, label=f"clean range [{lo:.3g}, {hi:.3g}]")
    outside = int(((p.reshape(p.shape[0], -1) > hi) | (p.reshape(p.shape[0], -1) < lo)).any(1).sum())
    ax.set_xlabel("L_inf magnitude (max |pixel|)")
    ax.set_ylabel("images")
    ax.set_title(title or f"poison magnitude: {outside} of {mags.size} poisons leave the clean range", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _stat(v: Any) -> tuple[float, float] | None:
    """(mean, spread) from {"mean", "std", "n"} or a number; None for null."""
    if v is None:
        return None
    if isinstance(v, dict):
        if v.get("mean") is None:
            return None
        std = v.get("std")
        return float(v["mean"]), float(std) if std is not None and math.isfinite(float(std)) else 0.0
    return float(v), 0.0


def row_label(row: dict) -> str:
    """An audit row's legend label: its ``label``, else the attack and beta."""
    if row.get("label"):
        return str(row["label"])
    beta = row.get("beta")
    return str(row.get("attack", "?")) + (f" (beta {beta:g})" if isinstance(beta, (int, float)) else "")


def drop_vs_epsilon(table: dict) -> bytes:
    """Accuracy drop (percentage points) against epsilon, one line per row of an audit table.

    table: {"clean_accuracy": {...}, "epsilons": [...], "rows": [{"attack", "beta", "label",
    "cells": {"<eps>": {"drop": {"mean", "std", "n"} | null, ...}}}], ...}; accuracies are
    fractions in [0, 1]. Cells whose drop is null (not run, failed) are left out of the line."""
    eps: Sequence[float] = [float(e) for e in table.get("epsilons", [])]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    drawn = 0
    for row in table.get("rows", []):
        cells = row.get("cells", {})
        xs, ys, es = [], [], []
        for e in eps:
            cell = _cell(cells, e)
            st = _stat(cell.get("drop")) if cell else None
            if st is not None:
                xs.append(e)
                ys.append(100 * st[0])
                es.append(100 * st[1])
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=row_label(row))
            drawn += 1
    ax.axhline(0, color="0.5", linewidth=0.8)
    if eps and min(eps) > 0 and max(eps) / min(eps) >= 10:
        ax.set_xscale("log")
    if eps:
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
        ax.minorticks_off()
    ax.set_xlabel("epsilon (poisons / clean training points)")
    ax.set_ylabel("accuracy drop (points)")
    clean = _stat(table.get("clean_accuracy"))
    ax.set_title("accuracy drop against epsilon" + (f" (clean {100 * clean[0]:.2f}%)" if clean else ""), fontsize=10)
    if drawn:
        legend = ax.legend(fontsize=8)
        for text in legend.get_texts():  # labels are user text: "$" must not start mathtext
            text.set_parse_math(False)
    else:
        ax.text(0.5, 0.5, "no finished cells yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _png(fig)


def _cell(cells: dict, eps: float) -> dict | None:
    """The cell of ``eps``, whatever string the producer wrote it as ("0.1", "0.10")."""
    for key, cell in cells.items():
        try:
            if math.isclose(float(key), eps, rel_tol=1e-9, abs_tol=1e-12):
                return cell
        except ValueError:
            continue
    return None


def _message(text: str):
    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def _message_figure(text: str) -> bytes:
    return _png(_message(text))
