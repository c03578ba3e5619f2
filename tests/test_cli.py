"""The CLI refuses bad input before any work, naming the valid choices."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from attacks import catalogue
from attacks.cli import main


def test_catalogue_names_match_the_engine_modules():
    from attacks import data, encoders

    assert catalogue.DATASET_KINDS == data.DATASET_KINDS
    assert catalogue.BUILTIN_DATASETS == data.BUILTIN_DATASETS
    assert catalogue.ARCHITECTURES == encoders.ARCHITECTURES


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "attacks.cli", *args], capture_output=True, text=True, timeout=300)


def test_unknown_attack_names_the_valid_ones(tmp_path):
    r = _cli("run", "--encoder", str(tmp_path), "--dataset", "digits", "--attack", "fgsm", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    for name in catalogue.CATALOGUE:
        assert name in r.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_dataset_names_the_valid_ones(tmp_path):
    r = _cli("run", "--encoder", str(tmp_path), "--dataset", "imagenet", "--attack", "gradpc", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    for name in catalogue.DATASET_KINDS:
        assert name in r.stderr


@pytest.mark.parametrize(
    "args,field",
    [
        (["--epsilon", "0"], "epsilon"),
        (["--epsilon", "1.5"], "epsilon"),
        (["--beta", "-1"], "beta"),
        (["--param", "fm_steps=0"], "fm_steps"),
        (["--param", "bogus=1"], "bogus"),
    ],
)
def test_out_of_range_parameters_are_refused_before_work(args, field, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["run", "--encoder", str(tmp_path / "missing"), "--dataset", "digits", "--attack",
                 "feature_matching", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert field in err
    assert not out.exists()  # nothing was started: the encoder path does not even exist


def test_run_writes_result_and_poisoned_set(tiny_encoder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--encoder", str(tiny_encoder_dir), "--dataset", "digits", "--max-train", "200",
                 "--max-test", "100", "--attack", "feature_matching", "--epsilon", "0.05", "--beta", "0.1",
                 "--param", "gc_steps=20", "--param", "fm_steps=3", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["attack"] == "feature_matching" and result["beta"] == 0.1
    assert result["n_poisons"] == 10
    with np.load(out / "poisoned.npz", allow_pickle=False) as z:
        assert z["x"].shape == (10, 1, 8, 8) and z["y"].shape == (10,)
    assert "drop" in capsys.readouterr().out
    assert set(result["defences"]) == {"linf", "knn", "spectral"}
    quick = tmp_path / "quick"
    assert main(["run", "--encoder", str(tiny_encoder_dir), "--dataset", "digits", "--max-train", "200",
                 "--max-test", "100", "--attack", "gc_feature", "--param", "gc_steps=20", "--device", "cpu",
                 "--quiet", "--no-defences", "--out", str(quick)]) == 0
    assert "defences" not in json.loads((quick / "result.json").read_text())


def test_missing_encoder_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "--encoder", str(tmp_path / "nope"), "--dataset", "digits", "--attack", "gradpc",
                 "--quiet", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_audit_spec_that_is_not_an_object_is_a_usage_error(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text("[]")
    rc = main(["audit", "--url", "http://127.0.0.1:9", "--api-key", "k", "--spec", str(spec)])
    assert rc == 2
    assert "--spec must hold a JSON object" in capsys.readouterr().err
