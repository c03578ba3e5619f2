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
