"""Tests for attacks.data: built-ins, CIFAR pickles, npz uploads, image folders, and every refusal."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attacks import data as D
from attacks.data import DATASET_KINDS, Dataset, DatasetError, load_dataset, load_npz, save_npz

# sha256 of the digits arrays: pins the split, the scaling and the hash format across processes.
DIGITS_HASH = "8b2935f9bb5f72f1a0f58b146134e263f2569c57990f6dc52f66719cdd41fae2"


def _assert_well_formed(ds: Dataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.dim() == 4 and x.is_contiguous() and y.is_contiguous()
        assert len(x) == len(y) > 0
        assert tuple(x.shape[1:]) == ds.image_shape
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes
    assert len(ds.classes) == ds.num_classes
    assert json.loads(json.dumps(ds.describe()))["content_hash"] == ds.content_hash


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("name", "shape", "n_train", "n_test"),
    [("digits", (1, 8, 8), 1437, 360), ("mnist5k", (1, 28, 28), 4000, 1000)],
)
def test_builtin_shapes_ranges_and_classes(name: str, shape: tuple[int, int, int], n_train: int, n_test: int) -> None:
    ds = load_dataset(name)
    _assert_well_formed(ds)
    assert ds.name == name
    assert ds.image_shape == shape
    assert (ds.n_train, ds.n_test) == (n_train, n_test)
    assert ds.num_classes == 10 and ds.classes == tuple(str(i) for i in range(10))
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0
    assert ds.describe() == {
        "name": name,
        "n_train": n_train,
        "n_test": n_test,
        "image_shape": list(shape),
        "num_classes": 10,
        "content_hash": ds.content_hash,
        "split": ds.split,
    }
    assert "default_rng(0)" in ds.split


def test_digits_split_is_the_documented_permutation() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    ds = load_dataset("digits")
    expected = torch.from_numpy((bunch.images / 16).astype(np.float32))[:, None]
    assert torch.equal(ds.x_train, expected[perm[:1437]])
    assert torch.equal(ds.x_test, expected[perm[1437:]])
    assert ds.y_test.tolist() == bunch.target[perm[1437:]].tolist()


def test_builtin_is_cached_and_its_hash_deterministic() -> None:
    first = load_dataset("digits")
    assert load_dataset("digits") is first  # cached: the same frozen object
    D._builtin.cache_clear()
    D._builtin_view.cache_clear()
    rebuilt = load_dataset("digits")
    assert rebuilt is not first
    assert rebuilt.content_hash == first.content_hash == DIGITS_HASH
    assert torch.equal(rebuilt.x_train, first.x_train)
    with pytest.raises(AttributeError):
        rebuilt.name = "other"  # type: ignore[misc]


def test_max_train_and_max_test_take_the_first_images() -> None:
    full = load_dataset("digits")
    small = load_dataset("digits", max_train=100, max_test=20)
    assert (small.n_train, small.n_test) == (100, 20)
    assert torch.equal(small.x_train, full.x_train[:100]) and torch.equal(small.y_test, full.y_test[:20])
    assert small.name == "digits" and small.num_classes == 10
    assert small.content_hash != full.content_hash
    assert load_dataset("digits", max_train=100, max_test=20) is small
    assert load_dataset("digits", max_train=10**6, max_test=10**6) is full  # nothing to cut


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_max_train_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(DatasetError, match="max_train must be a positive integer"):
        load_dataset("digits", max_train=bad)  # type: ignore[arg-type]


def test_unknown_name_lists_valid_choices() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'") as err:
        load_dataset("imagenet")
    for kind in DATASET_KINDS:
        assert kind in str(err.value)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "npz", "imagefolder"])
def test_file_formats_need_a_path(kind: str) -> None:
    with pytest.raises(DatasetError, match=f"'{kind}' is read from files: give its path"):
        load_dataset(kind)


def test_builtin_refuses_a_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="built in and takes no path"):
        load_dataset("digits", tmp_path)


def test_dataset_validates_its_tensors() -> None:
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    ds = Dataset.from_arrays("t", x, y, x, y)
    assert ds.classes == ("0", "1") and ds.content_hash == D.content_hash(x, y, x, y)
    assert "x_train" not in repr(ds) and "name='t'" in repr(ds)
    with pytest.raises(DatasetError, match="x_train must be a float32 tensor"):
        Dataset.from_arrays("t", x.double(), y, x, y)
    with pytest.raises(DatasetError, match=r"test labels span \[0, 2\], outside \[0, 2\)"):
        Dataset.from_arrays("t", x, y, x, y * 2, classes=["a", "b"])


# --------------------------------------------------------------------------- CIFAR


_CifarArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def _write_cifar(root: Path, kind: str, protocol: int) -> _CifarArrays:
    """Tiny CIFAR batches in the official layout (bytes keys, as the Python 2 originals read with encoding='bytes')."""
    rng = np.random.default_rng(1)
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        train_files, test_files, n_classes = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], 10
        meta_file, meta = "batches.meta", {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 3}
    else:
        folder = root / "cifar-100-python"
        names = [f"fine{i}" for i in range(100)]
        train_files, test_files, n_classes = ["train"], ["test"], 100
        meta_file = "meta"
        coarse = [b"c%d" % i for i in range(20)]
        meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": coarse}
    folder.mkdir(parents=True)
    with (folder / meta_file).open("wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)

    def write(files: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fname in files:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, n_classes, n).tolist()
            entry = {b"batch_label": fname.encode(), b"data": data, b"filenames": [b"img.png"] * n}
            if kind == "cifar10":
                entry[b"labels"] = labels
            else:
                entry[b"fine_labels"], entry[b"coarse_labels"] = labels, [label // 5 for label in labels]
            with (folder / fname).open("wb") as fh:
                pickle.dump(entry, fh, protocol=protocol)
            xs.append(data)
            ys.append(labels)
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = write(train_files, 3 if kind == "cifar10" else 8)
    x_test, y_test = write(test_files, 4)
    return x_train, y_train, x_test, y_test, names


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_reads_the_torchvision_layout(tmp_path: Path, kind: str, protocol: int) -> None:
    x_train, y_train, x_test, y_test, names = _write_cifar(tmp_path, kind, protocol)
    ds = load_dataset(kind, tmp_path)
    _assert_well_formed(ds)
    assert ds.name == kind and ds.classes == tuple(names) and ds.num_classes == len(names)
    assert (ds.n_train, ds.n_test) == (len(x_train), len(x_test)) and ds.image_shape == (3, 32, 32)
    # Each row is the R, G, B planes in turn: pixel (row 0, col 1) of the green plane is column 1024 + 1.
    assert ds.x_train[2, 1, 0, 1].item() == pytest.approx(x_train[2, 1024 + 1] / 255)
    assert torch.equal(ds.x_test, torch.from_numpy(x_test.reshape(-1, 3, 32, 32).astype(np.float32) / 255))
    assert ds.y_train.tolist() == y_train.tolist() and ds.y_test.tolist() == y_test.tolist()
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert load_dataset(kind, folder).content_hash == ds.content_hash  # the folder itself works too


def test_cifar_max_train_and_max_test(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10", 2)
    ds = load_dataset("cifar10", str(tmp_path), max_train=5, max_test=2)
    assert (ds.n_train, ds.n_test) == (5, 2)


def test_cifar_missing_root_names_every_path_it_looked_in(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="never downloaded") as err:
        load_dataset("cifar10", root)
    assert str(root / "cifar-10-batches-py") in str(err.value)
    assert f"{root} (no such directory)" in str(err.value)


def test_cifar_missing_batch_is_named(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar100", 2)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DatasetError, match=r"cifar-100-python \(missing test\)"):
        load_dataset("cifar100", tmp_path)


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (str(self.target),))


def test_cifar_pickle_globals_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10", 2)
    marker = tmp_path / "pwned"
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as fh:
        pickle.dump({b"data": _Exploit(marker), b"labels": []}, fh)
    with pytest.raises(DatasetError, match="is not allowed in a CIFAR batch"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------- npz


def _labels(n: int, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


def test_npz_nhwc_uint8_with_test_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (12, 5, 6, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "upload.npz"
    np.savez(path, x=x, y=_labels(12), x_test=x_test, y_test=np.array([0, 1, 2, 4]))
    ds = load_dataset("npz", path)
    _assert_well_formed(ds)
    assert ds.image_shape == (3, 5, 6) and (ds.n_train, ds.n_test) == (12, 4)
    assert torch.equal(ds.x_train, torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255))
    assert ds.y_test.tolist() == [0, 1, 2, 4]
    assert ds.num_classes == 5 and ds.classes == ("0", "1", "2", "3", "4")
    assert ds.name == f"npz:{ds.content_hash[:12]}"
    assert "own" in ds.split


def test_npz_nchw_float_without_test_arrays_gets_a_stratified_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], [20, 10, 5])
    x = rng.random((35, 1, 4, 4)).astype(np.float64)
    x[:, 0, 0, 0] = np.arange(35) / 100  # a fingerprint per image
    path = tmp_path / "a.npz"
    np.savez_compressed(path, x=x, y=y)
    ds = load_npz(path)
    _assert_well_formed(ds)
    assert (ds.n_train, ds.n_test) == (28, 7)
    assert np.bincount(ds.y_test.numpy()).tolist() == [4, 2, 1]  # floor(0.2 * n_c + 0.5) per class
    ids = np.round(torch.cat([ds.x_train, ds.x_test])[:, 0, 0, 0].double().numpy() * 100).astype(int)
    assert sorted(ids.tolist()) == list(range(35))  # a partition of the images
    labels = torch.cat([ds.y_train, ds.y_test]).numpy()
    assert (labels == y[ids]).all()  # labels travel with their images
    assert torch.equal(ds.x_train[0], torch.from_numpy(x[ids[0]].astype(np.float32)))  # floats kept as stored
    assert load_npz(path).content_hash == ds.content_hash
    assert "stratified 80/20" in ds.split


def test_npz_3d_input_is_one_grey_channel(tmp_path: Path) -> None:
    x = np.random.default_rng(4).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    path = tmp_path / "g.npz"
    np.savez(path, x=x, y=_labels(10, 2), x_test=x[:2], y_test=np.array([0, 1]))
    ds = load_npz(path, name="mine")
    assert ds.name == "mine" and ds.image_shape == (1, 7, 3)
    assert torch.equal(ds.x_test[:, 0], torch.from_numpy(x[:2].astype(np.float32) / 255))


def test_npz_hash_depends_on_content_only(tmp_path: Path) -> None:
    digits = load_dataset("digits")
    a, b = save_npz(digits, tmp_path / "a.npz"), save_npz(digits, tmp_path / "b.bin")
    assert b.name == "b.bin"
    from_a, from_b = load_npz(a), load_dataset("npz", b)
    assert from_a.content_hash == from_b.content_hash == digits.content_hash
    assert from_a.name == from_b.name == f"npz:{digits.content_hash[:12]}"
    assert torch.equal(from_a.x_test, digits.x_test)


def test_save_npz_with_arrays_and_class_names(tmp_path: Path) -> None:
    x = torch.rand(10, 3, 4, 5)
    y = torch.tensor(_labels(10, 2))
    path = save_npz({"x": x, "y": y, "classes": np.array(["cat", "dog"])}, tmp_path / "c.npz")
    ds = load_npz(path)
    assert ds.classes == ("cat", "dog") and ds.n_train + ds.n_test == 10
    with pytest.raises(DatasetError, match=r"unknown npz key\(s\) \['z'\]"):
        save_npz({"x": x, "y": y, "z": y}, tmp_path / "d.npz")


def _npz_case(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]  # saving allows pickles: object arrays get written
    return path


_X = np.zeros((10, 4, 4), dtype=np.uint8)
_Y = _labels(10, 2)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.full((10, 4, 4), np.nan, np.float32), "y": _Y}, "NaN or infinite"),
        ({"x": np.where(np.eye(4) > 0, np.inf, 0.5)[None].repeat(10, 0), "y": _Y}, "NaN or infinite"),
        ({"x": _X, "y": _Y[:9]}, "'x' has 10 images but 'y' has 9 labels"),
        ({"x": _X, "y": np.array([object()] * 10, dtype=object)}, r"holds Python objects .*allow_pickle=False"),
        ({"x": _X.astype(object), "y": _Y}, r"'x' holds Python objects"),
        ({"x": _X, "y": _Y - 1}, "negative labels"),
        ({"x": _X, "y": _Y.astype(np.float32)}, "labels must be integers"),
        ({"x": _X, "y": np.zeros(10, dtype=np.int64)}, "single class"),
        ({"x": _X}, r"missing key\(s\) \['y'\]; found \['x'\]"),
        ({"x": _X, "y": _Y, "x_test": _X}, "'x_test' and 'y_test' come together"),
        ({"x": _X, "y": _Y, "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": _Y[:2]}, "but 'x_test' images are"),
        ({"x": np.zeros((10, 5, 4, 4), np.uint8), "y": _Y}, "no channel axis"),
        ({"x": np.zeros((10, 3, 8, 3), np.uint8), "y": _Y}, "ambiguous layout"),
        ({"x": np.zeros((10, 16), np.uint8), "y": _Y}, r"must be \(N, H, W\)"),
        ({"x": np.full((10, 4, 4), 255.0), "y": _Y}, r"float images must lie in \[0, 1\]"),
        ({"x": np.full((10, 4, 4), 300, np.int64), "y": _Y}, "integer images must be 8-bit"),
        ({"x": _X, "y": _Y * 10**6}, "at most 1,000 classes"),
        ({"x": _X, "y": _Y.reshape(5, 2)}, r"'y' must be 1-D"),
        ({"x": _X.astype(bool), "y": _Y}, "expected uint8"),
    ],
)
def test_npz_refusals(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = _npz_case(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset("npz", path)
    assert str(path) in str(err.value)  # every message says which file


def test_npz_refuses_files_that_are_not_archives(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    with pytest.raises(DatasetError, match=f"npz file not found: {missing}"):
        load_npz(missing)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match=r"is not a valid \.npz archive"):
        load_npz(junk)
    npy = tmp_path / "single.npz"
    with npy.open("wb") as fh:
        np.save(fh, _X)
    with pytest.raises(DatasetError, match=r"holds a single array \(.npy\)"):
        load_npz(npy)


def test_npz_refuses_arrays_over_the_size_limit_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _npz_case(tmp_path, x=_X, y=_Y)
    monkeypatch.setattr(D, "MAX_ELEMENTS", 100)
    with pytest.raises(DatasetError, match="160 pixel values exceed the limit of 100"):
        load_npz(path)


# --------------------------------------------------------------------------- image folders


def _write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_imagefolder_rgb_with_train_and_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    written: dict[tuple[str, int], list[np.ndarray]] = {}
    for split, per_class in (("train", 4), ("test", 2)):
        for cls, label in (("cat", 2), ("ant", 0), ("bee", 1)):  # labels follow the sorted folder names
            for i in range(per_class):
                img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                _write_image(tmp_path / split / cls / f"{i}.png", img)
                written.setdefault((split, label), []).append(img)
    ds = load_dataset("imagefolder", tmp_path)
    _assert_well_formed(ds)
    assert ds.classes == ("ant", "bee", "cat") and ds.image_shape == (3, 6, 5)
    assert (ds.n_train, ds.n_test) == (12, 6)
    assert ds.name == f"imagefolder:{ds.content_hash[:12]}"
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        for image, label in zip(x, y.tolist(), strict=True):
            pixels = np.round(image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
            assert any(np.array_equal(pixels, w) for w in written[(split, label)])
    assert len(set(ds.y_train[:3].tolist())) > 1  # seeded order: the first images are not all of one class
    assert load_dataset("imagefolder", tmp_path).content_hash == ds.content_hash


def test_imagefolder_greyscale_without_split(tmp_path: Path) -> None:
    for cls, n in (("0", 10), ("1", 5)):
        for i in range(n):
            _write_image(tmp_path / cls / f"img{i:02d}.PNG", np.full((4, 4), 10 * i + int(cls), np.uint8))
    (tmp_path / "0" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", tmp_path, max_test=2)
    assert ds.image_shape == (1, 4, 4) and ds.classes == ("0", "1")
    assert (ds.n_train, ds.n_test) == (12, 2)
    full = load_dataset("imagefolder", tmp_path)
    assert np.bincount(full.y_test.numpy()).tolist() == [2, 1]
    assert "stratified 80/20" in full.split


def test_imagefolder_mixed_grey_and_colour_becomes_rgb(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "grey.png", np.full((3, 3), 200, np.uint8))
    for i in range(4):
        _write_image(tmp_path / "a" / f"c{i}.png", np.zeros((3, 3, 3), np.uint8))
        _write_image(tmp_path / "b" / f"c{i}.png", np.full((3, 3, 3), 50, np.uint8))
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.image_shape == (3, 3, 3)
    everything = torch.cat([ds.x_train, ds.x_test])
    assert any(torch.allclose(img, torch.full((3, 3, 3), 200 / 255)) for img in everything)


def test_imagefolder_refuses_mixed_sizes_naming_the_file(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _write_image(tmp_path / "b" / "1.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(DatasetError, match="all images must share one size") as err:
        load_dataset("imagefolder", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "b" / "1.png") in message and "6x4" in message and "4x4" in message


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train/a/0.png": 1, "train/b/0.png": 1}, "found train/ but no test/"),
        ({"train/a/0.png": 1, "train/b/0.png": 1, "test/a/0.png": 1, "test/c/0.png": 1}, r"only in train: \['b'\]"),
        ({"a/0.png": 1, "b/readme.txt": 0}, "no images"),
        ({"a/0.png": 1, "b/broken.png": 0}, "not a readable image"),
        ({"loose.png": 1}, "no class folders"),
    ],
)
def test_imagefolder_refusals(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    for rel, is_image in layout.items():
        target = tmp_path / rel
        if is_image:
            _write_image(target, np.zeros((2, 2), np.uint8))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=message):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"image folder not found: {tmp_path / 'nope'}"):
        load_dataset("imagefolder", tmp_path / "nope")


# --------------------------------------------------------------------------- zip bombs and lying headers

_BOMB_N = 16_384  # (16384, 64, 64) uint8: 64 MiB of zeros, about 65 KB compressed


def _write_bomb(path: Path) -> int:
    """An npz whose x is 64 MiB of zeros, written in 1 MiB pieces (the test never holds it)."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (_BOMB_N, 64, 64)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            zero = bytes(2**20)
            for _ in range(_BOMB_N * 64 * 64 // len(zero)):
                fh.write(zero)
        np.save(buf := io.BytesIO(), (np.arange(_BOMB_N) % 2).astype(np.int64))
        zf.writestr("y.npy", buf.getvalue())
    return _BOMB_N * 64 * 64


def _peak(fn) -> tuple[int, object]:
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - returned for the caller to check
            out = exc
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_zip_bomb_is_refused_by_its_decompressed_size_with_bounded_memory(tmp_path: Path) -> None:
    from attacks.datacheck import DatasetLimits, NpzCheckError, check_npz

    path = tmp_path / "bomb.npz"
    inflated = _write_bomb(path)
    assert path.stat().st_size < inflated // 500
    limits = DatasetLimits(max_bytes=32 * 2**20)

    peak, err = _peak(lambda: check_npz(path, limits))  # the upload check
    assert isinstance(err, NpzCheckError) and "over the limit of 33,554,432" in str(err)
    assert peak < 2**20  # refused from the zip's declared sizes: nothing decompressed

    peak, err = _peak(lambda: load_npz(path, limits=limits))  # the worker's loader
    assert isinstance(err, DatasetError) and "over the limit of 33,554,432" in str(err)
    assert peak < 2**20

    # Under the cap, the upload check streams all 64 MiB in chunks: memory stays near one chunk.
    peak, summary = _peak(lambda: check_npz(path, DatasetLimits(max_bytes=2 * inflated, max_ratio=10**6)))
    assert isinstance(summary, dict) and summary["decompressed_bytes"] > inflated, summary
    assert peak < 8 * 2**20, peak

    # With the default limits (1 GiB), 64 MiB from 65 KB is refused by its compression ratio, unread.
    for fn in (lambda: check_npz(path), lambda: load_npz(path)):
        peak, err = _peak(fn)
        assert isinstance(err, ValueError) and "more than 200:1 is refused as a zip bomb" in str(err), err
        assert peak < 2**20


def _patch_declared_size(data: bytes, member: str, size: int) -> bytes:
    import struct

    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        (name_len,) = struct.unpack_from("<H", data, at + 28)
        if data[at + 46 : at + 46 + name_len] == member.encode():
            return data[: at + 24] + struct.pack("<I", size) + data[at + 28 :]
        at += 4


def test_declared_shapes_and_sizes_are_checked_before_allocating(tmp_path: Path) -> None:
    import zipfile

    from attacks.datacheck import check_npz

    def npy(shape, data: bytes) -> bytes:
        h = io.BytesIO()
        np.lib.format.write_array_header_1_0(h, {"descr": "|u1", "fortran_order": False, "shape": shape})
        return h.getvalue() + data

    y = io.BytesIO()
    np.save(y, (np.arange(10) % 2).astype(np.int64))
    # A header declaring (2**40, 28, 28) (862 TB) with 1 KB of data.
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(huge, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", npy((2**40, 28, 28), b"\0" * 1024))
        zf.writestr("y.npy", y.getvalue())
    for fn in (lambda: check_npz(huge), lambda: load_npz(huge)):
        peak, err = _peak(fn)
        assert isinstance(err, ValueError) and "holds 1,024 bytes of data" in str(err), err
        assert peak < 2**20
    # The zip declares 640 bytes for x (as its header does) but the stream holds 8 MiB: never read past 640.
    liar = tmp_path / "liar.npz"
    head = npy((10, 8, 8), b"")
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", head + bytes(8 * 2**20))
        zf.writestr("y.npy", y.getvalue())
    liar.write_bytes(_patch_declared_size(liar.read_bytes(), "x.npy", len(head) + 640))
    for fn in (lambda: check_npz(liar), lambda: load_npz(liar)):
        peak, err = _peak(fn)
        assert isinstance(err, ValueError) and "Bad CRC-32" in str(err), err
        assert peak < 2**20


def test_imagefolder_obeys_the_class_and_side_limits(tmp_path: Path) -> None:
    from attacks.datacheck import DatasetLimits

    for cls in ("a", "b", "c"):
        for i in range(3):
            _write_image(tmp_path / cls / f"{i}.png", np.zeros((40, 40), np.uint8))
    assert load_dataset("imagefolder", tmp_path).image_shape == (1, 40, 40)
    with pytest.raises(DatasetError, match="at most 32 pixels a side"):
        load_dataset("imagefolder", tmp_path, limits=DatasetLimits(max_side=32))
    with pytest.raises(DatasetError, match="3 class folders; at most 2 are supported"):
        load_dataset("imagefolder", tmp_path, limits=DatasetLimits(max_classes=2))
