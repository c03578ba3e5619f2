"""The catalogue validates every job parameter before any work, and imports no torch."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from attacks.catalogue import CATALOGUE, UnknownAttackError, get_attack, validate_job


def test_catalogue_imports_no_torch():
    code = "import attacks, attacks.catalogue, attacks.progress, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attack_lists_valid_names():
    with pytest.raises(UnknownAttackError) as e:
        get_attack("fgsm")
    for name in CATALOGUE:
        assert name in str(e.value)


@pytest.mark.parametrize("epsilon", [0, -0.1, 1.01, float("nan")])
def test_epsilon_outside_unit_interval_refused(epsilon):
    with pytest.raises(ValidationError) as e:
        validate_job("gc_feature", epsilon=epsilon)
    assert e.value.errors()[0]["loc"] == ("epsilon",)


def test_negative_beta_refused():
    with pytest.raises(ValidationError) as e:
        validate_job("feature_matching", epsilon=0.1, beta=-0.1)
    assert e.value.errors()[0]["loc"] == ("beta",)


def test_beta_on_attack_without_beta_refused():
    with pytest.raises(ValueError, match="takes no beta"):
        validate_job("gc_feature", beta=0.25)


def test_feature_matching_beta_defaults_to_paper_value():
    opts, _ = validate_job("feature_matching")
    assert opts.beta == 0.25


@pytest.mark.parametrize(
    "attack,params,field",
    [
        ("feature_matching", {"fm_steps": 0}, "fm_steps"),
        ("feature_matching", {"rounds": 0}, "rounds"),
        ("gc_feature", {"gc_steps": 0}, "gc_steps"),
        ("gc_feature", {"gc_lr": 0}, "gc_lr"),
        ("gradpc", {"eps_w": -1}, "eps_w"),
        ("gradpc", {"target_accuracy": 1.5}, "target_accuracy"),
        ("feature_matching", {"pairing": "random"}, "pairing"),
        ("feature_matching_r", {"anomaly_margin": -1}, "anomaly_margin"),
        ("gradpc", {"fm_steps": 10}, "fm_steps"),  # a parameter the attack does not take
    ],
)
def test_each_invalid_parameter_is_refused_naming_the_field(attack, params, field):
    with pytest.raises(ValidationError) as e:
        validate_job(attack, params=params)
    assert field in e.value.errors()[0]["loc"]


def test_head_recipe_validated():
    with pytest.raises(ValidationError):
        validate_job("gradpc", head={"optimizer": "adam"})


def test_every_attack_publishes_a_json_schema_with_defaults():
    for name, info in CATALOGUE.items():
        schema = info.schema_json()
        assert schema["type"] == "object", name
        assert schema["properties"], name
        assert all("default" in p for p in schema["properties"].values()), name
        assert info.entry.startswith("attacks.") and info.paper


def test_params_models_are_frozen():
    _, params = validate_job("feature_matching")
    with pytest.raises(ValidationError):
        params.fm_steps = 3


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_parameters_refused(bad):
    with pytest.raises(ValidationError):
        validate_job("gc_feature", params={"stop_loss": bad})
    with pytest.raises(ValidationError):
        validate_job("gradpc", head={"lr": bad})


def test_emn_end_to_end_needs_two_images_per_batch():
    with pytest.raises(ValidationError, match="batch_size >= 2"):
        validate_job("emn", epsilon=1.0, params={"end_to_end": True, "batch_size": 1})
    validate_job("emn", epsilon=1.0, params={"batch_size": 1})  # frozen: fine
