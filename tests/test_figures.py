"""attacks.figures: valid PNGs of sensible size, deterministic, and showing their input."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from attacks import figures as F

SIG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk (which must come first)."""
    assert data[:8] == SIG, "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def pixels(data: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png")


def _pairs(c=1, hw=(28, 28), n=5, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, c, *hw, generator=g)
    return clean, clean + scale * torch.randn(n, c, *hw, generator=g)


TABLE = {
    "clean_accuracy": {"mean": 0.93, "std": 0.004, "n": 3},
    "epsilons": [0.03, 0.1, 1.0],
    "rows": [
        {"attack": "feature_matching", "beta": 0.25, "label": "FM beta 0.25", "cells": {
            "0.03": {"poisoned_accuracy": {"mean": 0.91, "std": 0.01, "n": 3}, "drop": {"mean": 0.02, "std": 0.01, "n": 3}},
            "0.1": {"poisoned_accuracy": None, "drop": None},
            "1": {"poisoned_accuracy": {"mean": 0.7, "std": 0.02, "n": 3}, "drop": {"mean": 0.23, "std": 0.02, "n": 3}}}},
        {"attack": "gc_feature", "beta": None, "cells": {
            "0.03": {"poisoned_accuracy": {"mean": 0.6, "std": 0.0, "n": 1}, "drop": {"mean": 0.33, "std": 0.0, "n": 1}}}},
    ],
    "summary": [],
}


@pytest.mark.parametrize("channels,hw", [(1, (8, 8)), (1, (28, 28)), (3, (32, 32)), (3, (64, 48))])
def test_examples_figure_any_channels_and_size(channels, hw):
    clean, poisons = _pairs(channels, hw)
    png = F.examples_figure(clean, poisons, n=4)
    w, h = png_size(png)
    assert 300 <= w <= 2000 and 300 <= h <= 2000
    assert w > h, "four columns, three rows"
    img = pixels(png)
    assert img.shape[:2] == (h, w) and img[..., :3].std() > 0.05, "not a blank canvas"


def test_examples_figure_is_deterministic_and_shows_its_input():
    clean, poisons = _pairs()
    a = F.examples_figure(clean, poisons)
    assert a == F.examples_figure(clean.clone(), poisons.clone())
    other = F.examples_figure(clean, clean + 0.05)  # a different perturbation
    assert a != other
    pa, po = pixels(a), pixels(other)
    assert pa.shape == po.shape and np.abs(pa - po).mean() > 0.01


def test_examples_figure_refuses_mismatched_shapes_and_handles_no_poisons():
    clean, poisons = _pairs()
    with pytest.raises(ValueError):
        F.examples_figure(clean, poisons[:, :, :10])
    with pytest.raises(ValueError):
        F.examples_figure(torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8))
    assert png_size(F.examples_figure(clean[:0], poisons[:0]))[0] > 0


def test_linf_histogram():
    clean, poisons = _pairs(scale=0.5)
    png = F.linf_histogram(poisons, (0.0, 1.0), clean=clean)
    w, h = png_size(png)
    assert (w, h) == (640, 400)
    assert png == F.linf_histogram(poisons, (0.0, 1.0), clean=clean)
    inside = F.linf_histogram(clean * 0.5, (0.0, 1.0), clean=clean)
    assert np.abs(pixels(png) - pixels(inside)).mean() > 0.005
    assert png_size(F.linf_histogram(poisons[:0], (0.0, 1.0)))[0] > 0


def test_drop_vs_epsilon():
    png = F.drop_vs_epsilon(TABLE)
    assert png_size(png) == (720, 440)
    assert png == F.drop_vs_epsilon(TABLE)
    other = {**TABLE, "rows": TABLE["rows"][:1]}
    assert np.abs(pixels(png) - pixels(F.drop_vs_epsilon(other))).mean() > 0.001
    empty = F.drop_vs_epsilon({"epsilons": [0.1], "rows": []})
    assert png_size(empty) == (720, 440)


def test_row_label():
    assert F.row_label({"attack": "fm", "beta": 0.25}) == "fm (beta 0.25)"
    assert F.row_label({"attack": "fm", "beta": 0.25, "label": "mine"}) == "mine"


def test_drop_vs_epsilon_draws_labels_with_dollar_signs_as_text():
    table = {**TABLE, "rows": [{**TABLE["rows"][0], "label": "$x^$ {odd}"}] + TABLE["rows"][1:]}
    png = F.drop_vs_epsilon(table)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ perturbation panels (#16)
def _mixed(c=1, hw=(16, 16)):
    """Six pairs: large, zero, tiny, zero, small, zero perturbations."""
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(6, c, *hw, generator=g)
    poisons = clean.clone()
    for j, s in ((0, 0.5), (2, 1e-4), (4, 0.01)):
        poisons[j] += s * torch.randn(c, *hw, generator=g)
    return clean, poisons


def _panel_pixels(fig, png: bytes, ax) -> np.ndarray:
    """The RGB pixels of one axes in the PNG rendered from ``fig`` (same size, dpi, no tight bbox)."""
    img = pixels(png)[..., :3]
    h = img.shape[0]
    box = ax.get_window_extent()
    x0, x1 = int(np.ceil(box.x0)) + 2, int(np.floor(box.x1)) - 2  # inside the frame
    y0, y1 = h - int(np.floor(box.y1)) + 2, h - int(np.ceil(box.y0)) - 2
    return img[y0:y1, x0:x1]


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_perturbations_say_so_and_tiny_ones_are_still_coloured(channels):
    clean, poisons = _mixed(channels)
    fig = F.build_examples_figure(clean, poisons, clean_range=(0.0, 1.0))
    png = F._png(fig)  # renders (and closes) this very figure
    assert png_size(png) == tuple(int(v) for v in fig.canvas.get_width_height())
    panels = fig.axes[12:18]  # rows clean (0-5), poison (6-11), perturbation (12-17), then the colour bar
    assert all(ax.get_ylabel() == "" for ax in panels[1:]) and panels[0].get_ylabel().startswith("poison - clean")
    linf = (poisons - clean).abs().flatten(1).max(1).values
    for j, ax in enumerate(panels):
        texts = [t.get_text() for t in ax.texts]
        if j in (1, 3, 5):
            assert texts == ["identical to base\n(max |δ| = 0)"], (j, texts)
            assert ax.get_title() == "max |δ| = 0"
            assert not ax.get_images()[0].get_array().any()  # no colour map of noise behind the text
        else:
            assert not texts, (j, texts)
            assert ax.get_title().startswith(f"max |δ| = {float(linf[j]):.3g}"), (j, ax.get_title())
            # its own symmetric scale: the colours span -max..+max of this panel (channel mean drawn)
            im = ax.get_images()[0]
            lo, hi = im.get_clim()
            bound = float((poisons[j] - clean[j]).mean(0).abs().max())
            assert lo == pytest.approx(-bound) and hi == pytest.approx(bound)
        px = _panel_pixels(fig, png, ax)
        red = ((px[..., 0] > 0.6) & (px[..., 2] < 0.45)).mean()
        blue = ((px[..., 2] > 0.6) & (px[..., 0] < 0.45)).mean()
        if j in (1, 3, 5):
            assert red == 0 and blue == 0, "no colour in a zero panel"
            assert (px.mean(2) < 0.3).mean() > 0.005, "its text is drawn"
        else:
            # the 1e-4 panel beside the 0.5 one too: strong reds and blues, not a near-white box
            assert red > 0.01 and blue > 0.01, (j, red, blue)
    assert "3 of 6 poisons shown are identical to their base" in fig._suptitle.get_text()


def test_channels_that_cancel_are_named_not_drawn_as_noise():
    clean = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    poisons = clean.clone()
    poisons[0, 0] += 0.1
    poisons[0, 1] -= 0.1  # channel mean 0 (to rounding), max |δ| 0.1
    poisons[1] += 0.02
    fig = F.build_examples_figure(clean, poisons, clean_range=(0.0, 1.0))
    try:
        first, second = fig.axes[4], fig.axes[5]
        assert [t.get_text() for t in first.texts] == ["channel mean 0\n(max |δ| = 0.1)"]
        assert len(second.texts) == 0 and second.get_title() == "max |δ| = 0.02"
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_examples_figure_png_is_the_built_figure():
    clean, poisons = _mixed()
    assert F.examples_figure(clean, poisons) == F._png(F.build_examples_figure(clean, poisons))
