"""Issue 13, item 7: bad input is a 422 naming the field, never a 500, on SQLite and on Postgres.

(a) JSON-in-form fields (an upload's ``spec``) nested absurdly deep; (b) NUL and other control
characters in the names, labels and references the API stores or queries by (psycopg refuses NUL in
text); (c) strict request types: a number is not a boolean, an int or a bool is not a string
(``"epsilon": true`` used to run at 1.0, ``"seed": "7"`` and ``"refit_bias": "yes"`` were accepted)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from sqlalchemy import func, select

from .test_api import _job_body, _problem
from .test_audits import _body as _audit_body

_PRETRAIN = {"name": "simclr", "architecture": "small_cnn", "dataset": "digits", "spec": {"in_channels": 1, "width": 8},
             "config": {"epochs": 1, "batch_size": 64}, "device": "cpu"}


def _counts(session):
    from app.models import Audit, Dataset, Encoder, Job

    return tuple(session.scalar(select(func.count()).select_from(m)) for m in (Encoder, Job, Dataset, Audit))


def _fields(p):
    return [e["field"] for e in p["errors"]]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# ------------------------------------------------------------------ (a) nesting depth
@pytest.mark.parametrize("depth", [40, 2_000, 100_000])
def test_deep_upload_spec_is_422_naming_spec(client, session, store, team_a, queue, tiny_encoder_dir, depth):
    _, h = team_a
    before = _counts(session)
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = client.post("/v1/encoders", data={"architecture": "small_cnn", "spec": '{"mean": ' + _deep(depth) + "}"},
                        files={"file": ("e.safetensors", f)}, headers=h)
    p = _problem(r, 422)
    assert _fields(p) == ["spec"] and "deep" in p["detail"], p
    assert _counts(session) == before and queue.checks == [] and list(store.list("teams")) == []


@pytest.mark.parametrize("depth", [40, 500, 2_000])
def test_deep_json_objects_in_bodies_are_4xx(client, session, team_a, ready_encoder, queue, depth):
    """``params``, ``head``, ``spec`` and ``config`` are free-form objects: bounded in depth before
    anything hashes, logs or stores them. (Past what a JSON parser takes, the body itself is refused.)"""
    _, h = team_a
    before = _counts(session)
    cases = [
        ("/v1/jobs", _job_body(ready_encoder.id, params={"gc_steps": "@DEEP@"}), "params"),
        ("/v1/jobs", _job_body(ready_encoder.id, head={"epochs": "@DEEP@"}), "head"),
        ("/v1/audits", _audit_body(ready_encoder.id, head={"epochs": "@DEEP@"}), "head"),
        ("/v1/audits", _audit_body(ready_encoder.id, attacks=[{"name": "gradpc", "params": {"x": "@DEEP@"}}]),
         "attacks.0.params"),
        ("/v1/encoders", {**_PRETRAIN, "config": {"epochs": "@DEEP@"}}, "config"),
        ("/v1/encoders", {**_PRETRAIN, "spec": {"mean": "@DEEP@"}}, "spec"),
    ]
    for url, body, field in cases:
        raw = json.dumps(body).replace('"@DEEP@"', _deep(depth))
        r = client.post(url, content=raw, headers={**h, "content-type": "application/json"})
        assert 400 <= r.status_code < 500, (url, field, r.status_code, r.text[:300])
        p = _problem(r, r.status_code)
        if depth < 100:  # parsed: the bound names the field
            assert r.status_code == 422 and _fields(p) == [field] and "deep" in p["detail"], (url, p)
        assert len(r.content) < 10_000
    assert _counts(session) == before and queue.sent == []


# ------------------------------------------------------------------ (b) NUL and control characters
@pytest.mark.parametrize("bad", ["a\x00b", "a\x1bb", "a\nb", "\x7f"], ids=["nul", "esc", "newline", "del"])
def test_control_characters_in_stored_names_are_422(client, session, store, team_a, ready_encoder, queue,
                                                     tiny_encoder_dir, digits_npz, bad):
    _, h = team_a
    before = _counts(session)
    r = client.post("/v1/encoders", json={**_PRETRAIN, "name": bad}, headers=h)
    assert _fields(_problem(r, 422)) == ["name"]
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = client.post("/v1/encoders", data={"architecture": "small_cnn", "name": bad},
                        files={"file": ("e.safetensors", f)}, headers=h)
    assert _fields(_problem(r, 422)) == ["name"]
    with open(digits_npz, "rb") as f:
        r = client.post("/v1/datasets", files={"file": ("d.npz", f)}, data={"name": bad}, headers=h)
    assert _fields(_problem(r, 422)) == ["name"]
    r = client.post("/v1/audits", json=_audit_body(ready_encoder.id, name=bad), headers=h)
    assert _fields(_problem(r, 422)) == ["name"]
    attacks = [{"name": "gradpc", "label": bad}]
    r = client.post("/v1/audits", json=_audit_body(ready_encoder.id, attacks=attacks, betas=None), headers=h)
    assert _fields(_problem(r, 422)) == ["attacks.0.label"]
    for field in ("dataset", "attack"):
        r = client.post("/v1/jobs", json=_job_body(ready_encoder.id, **{field: "digits" + bad}), headers=h)
        assert _fields(_problem(r, 422)) == [field]
    r = client.post("/v1/encoders", json={**_PRETRAIN, "dataset": "digits" + bad}, headers=h)
    assert _fields(_problem(r, 422)) == ["dataset"]
    r = client.post("/v1/encoders", json={**_PRETRAIN, "config": {"device": "cpu" + bad}}, headers=h)
    p = _problem(r, 422)  # NUL: refused in any string of a free-form object; the others by the config's own check
    assert _fields(p) == (["config"] if "\x00" in bad else ["config.device"]), p
    assert _counts(session) == before and queue.sent == [] and queue.checks == [] and list(store.list("teams")) == []


def test_nul_in_query_filters_is_422(client, team_a):
    _, h = team_a
    p = _problem(client.get("/v1/jobs", params={"attack": "gradpc\x00"}, headers=h), 422)
    assert _fields(p) == ["query.attack"]
    _problem(client.get("/v1/datasets/digits%00", headers=h), 404)


def test_free_text_keeps_ordinary_unicode_and_tabs_stay_out_of_names(client, team_a, digits_npz):
    _, h = team_a
    with open(digits_npz, "rb") as f:
        r = client.post("/v1/datasets", files={"file": ("d.npz", f)}, data={"name": "Ziffern \u00e9t\u00e9 \u6570\u5b57"},
                        headers=h)
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/datasets/{r.json()['id']}", headers=h).json()["name"] == "Ziffern \u00e9t\u00e9 \u6570\u5b57"
    p = _problem(client.post("/v1/encoders", json={**_PRETRAIN, "name": "a\tb"}, headers=h), 422)
    assert _fields(p) == ["name"]


# ------------------------------------------------------------------ (c) strict types
BAD_JOB = [
    ("epsilon_true", {"epsilon": True}, "epsilon"),
    ("epsilon_string", {"epsilon": "0.1"}, "epsilon"),
    ("beta_false", {"beta": False}, "beta"),
    ("seed_string", {"seed": "7"}, "seed"),
    ("seed_true", {"seed": True}, "seed"),
    ("seed_float", {"seed": 7.5}, "seed"),
    ("defences_string", {"defences": "no"}, "defences"),
    ("defences_int", {"defences": 0}, "defences"),
    ("dataset_int", {"dataset": 7}, "dataset"),
    ("refit_bias_yes", {"attack": "gradpc", "params": {"refit_bias": "yes"}}, "params.refit_bias"),
    ("eps_w_true", {"attack": "gradpc", "params": {"eps_w": True}}, "params.eps_w"),
    ("gc_steps_string", {"params": {"gc_steps": "50"}}, "params.gc_steps"),
    ("gc_steps_true", {"params": {"gc_steps": True}}, "params.gc_steps"),
    ("projected_one", {"params": {"projected": 1}}, "params.projected"),
    ("pairing_int", {"params": {"pairing": 3}}, "params.pairing"),
    ("head_epochs_string", {"head": {"epochs": "30"}}, "head.epochs"),
    ("head_l2_true", {"head": {"l2": True}}, "head.l2"),
]


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD_JOB], ids=[b[0] for b in BAD_JOB])
def test_lax_coercions_in_a_job_are_422(client, session, team_a, ready_encoder, queue, change, field):
    _, h = team_a
    before = _counts(session)
    p = _problem(client.post("/v1/jobs", json=_job_body(ready_encoder.id, **change), headers=h), 422)
    assert _fields(p) == [field], p
    assert _counts(session) == before and queue.sent == []


def test_json_ints_still_fill_float_fields(client, team_a, ready_encoder, queue):
    _, h = team_a
    r = client.post("/v1/jobs", json=_job_body(ready_encoder.id, attack="gradpc", epsilon=1, params={"eps_w": 2},
                                               head={"l2": 0}), headers=h)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["epsilon"] == 1.0 and job["params"] == {"eps_w": 2} and job["head"] == {"l2": 0}
    r = client.post("/v1/jobs", json=_job_body(ready_encoder.id, beta=1), headers=h)
    assert r.status_code == 202 and r.json()["beta"] == 1.0, r.text


BAD_AUDIT = [
    ("epsilons_true", {"epsilons": [True]}, "epsilons.0"),
    ("epsilons_string", {"epsilons": [0.1, "0.03"]}, "epsilons.1"),
    ("betas_true", {"betas": [True]}, "betas.0"),
    ("seeds_string", {"seeds": ["7"]}, "seeds.0"),
    ("seeds_false", {"seeds": [0, False]}, "seeds.1"),
    ("defences_string", {"defences": "yes"}, "defences"),
    ("name_int", {"name": 7}, "name"),
    ("params_string", {"attacks": [{"name": "gradpc", "params": {"refit_bias": "yes"}}], "betas": None},
     "attacks.0.params.refit_bias"),
    ("params_true", {"attacks": [{"name": "gc_feature", "params": {"gc_lr": True}}], "betas": None},
     "attacks.0.params.gc_lr"),
    ("head_string", {"head": {"max_iter": "10"}}, "head.max_iter"),
]


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD_AUDIT], ids=[b[0] for b in BAD_AUDIT])
def test_lax_coercions_in_an_audit_are_422(client, session, team_a, ready_encoder, queue, change, field):
    _, h = team_a
    before = _counts(session)
    p = _problem(client.post("/v1/audits", json=_audit_body(ready_encoder.id, **change), headers=h), 422)
    assert field in _fields(p), p
    assert _counts(session) == before and queue.sent == []


BAD_PRETRAIN = [
    ("seed_string", {"seed": "7"}, "seed"),
    ("name_int", {"name": 7}, "name"),
    ("config_epochs_string", {"config": {"epochs": "1"}}, "config.epochs"),
    ("config_flip_yes", {"config": {"flip": "yes"}}, "config.flip"),
    ("config_lr_true", {"config": {"lr": True}}, "config.lr"),
    ("spec_width_string", {"spec": {"in_channels": 1, "width": "8"}}, "spec.width"),
    ("spec_stem_one", {"spec": {"in_channels": 1, "cifar_stem": 1}}, "spec.cifar_stem"),
]


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD_PRETRAIN], ids=[b[0] for b in BAD_PRETRAIN])
def test_lax_coercions_in_a_pretrain_request_are_422(client, session, team_a, queue, change, field):
    _, h = team_a
    before = _counts(session)
    p = _problem(client.post("/v1/encoders", json={**_PRETRAIN, **change}, headers=h), 422)
    assert _fields(p) == [field], p
    assert _counts(session) == before and queue.sent == []


def test_pretrain_spec_lists_and_ints_are_still_accepted(client, team_a, queue):
    _, h = team_a
    body = {**_PRETRAIN, "spec": {"in_channels": 1, "width": 8, "mean": [0], "std": [1]},
            "config": {"epochs": 1, "batch_size": 64, "lr": 1, "crop_scale": [0.5, 1]}}
    r = client.post("/v1/encoders", json=body, headers=h)
    assert r.status_code == 202, r.text
    assert r.json()["encoder"]["spec"]["mean"] == [0]


@pytest.mark.parametrize(("spec", "field"), [({"in_channels": "1"}, "spec.in_channels"),
                                              ({"in_channels": 1, "cifar_stem": "yes"}, "spec.cifar_stem")])
def test_lax_coercions_in_an_upload_spec_are_422(client, session, store, team_a, queue, tiny_encoder_dir, spec, field):
    _, h = team_a
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        r = client.post("/v1/encoders", data={"architecture": "small_cnn", "spec": json.dumps(spec)},
                        files={"file": ("e.safetensors", f)}, headers=h)
    assert _fields(_problem(r, 422)) == [field]
    assert queue.checks == [] and list(store.list("teams")) == []


def test_the_engines_python_callers_keep_their_coercions():
    """Strictness is the HTTP boundary's: the engine's own models still take Python ints for floats."""
    from attacks.catalogue import GradPCParams, validate_job

    assert GradPCParams(eps_w=1).eps_w == 1.0 and GradPCParams(eps_w=1).step == "absolute"
    opts, params = validate_job("gradpc", 1, None, {"refit_bias": True}, 7, "cpu", {"epochs": 30})
    assert opts.epsilon == 1.0 and params.refit_bias is True and opts.head.epochs == 30


def test_lone_surrogates_in_json_strings_are_422(client, session, team_a, ready_encoder, queue):
    """JSON can spell a lone surrogate (``"\\ud800"``), which no UTF-8 text column can hold."""
    _, h = team_a
    before = _counts(session)

    def post(url, body):  # json.dumps escapes the surrogate (httpx's own encoder would refuse it)
        return client.post(url, content=json.dumps(body), headers={**h, "content-type": "application/json"})

    _problem(post("/v1/encoders", {**_PRETRAIN, "name": "a\ud800"}), 422)  # pydantic's JSON parser refuses it
    assert _fields(_problem(post("/v1/audits", _audit_body(ready_encoder.id, name="\udfff")), 422)) == ["name"]
    p = _problem(post("/v1/jobs", _job_body(ready_encoder.id, params={"pairing": "\ud800"})), 422)
    assert _fields(p) == ["params"] and "pairing" in p["detail"], p
    assert _counts(session) == before and queue.sent == []


def test_audits_stored_before_the_checks_still_read(client, session, team_a, ready_encoder):
    """The response reads stored attacks back as they are: a label an older server let in is shown, not a 500."""
    from app.models import Audit

    team, h = team_a
    r = client.post("/v1/audits", json=_audit_body(ready_encoder.id, attacks=[{"name": "gradpc"}], betas=None), headers=h)
    assert r.status_code == 202, r.text
    audit = session.get(Audit, uuid.UUID(r.json()["id"]))
    audit.attacks = [{"name": "gradpc", "params": {"refit_bias": "yes"}, "label": "old\nlabel"}]
    session.commit()
    r = client.get(f"/v1/audits/{audit.id}", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["attacks"][0]["label"] == "old\nlabel"
    assert client.get("/v1/audits", headers=h).status_code == 200
