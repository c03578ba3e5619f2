"""Schemathesis on the published OpenAPI: generated requests (valid and invalid ones), a bounded
number per operation, sent in process to the app on the embedded stack (SQLite, the SQLite broker,
the local store) and on Postgres with Redis. No answer may be a 5xx, and every answer must have a
documented status code and match the documented schema: once with a team's key (past the 401s),
once without one (or with the made-up credentials schemathesis generates).

The operations are driven through ``APIOperation.as_strategy`` under Hypothesis' ``@given``, not
``schema.parametrize()``, whose pytest plugin writes ``Node._nodeid``, which pytest 9.2 no longer has.
``POISONAUDIT_SCHEMATHESIS_EXAMPLES`` sets the bound per operation (CI uses the default)."""

from __future__ import annotations

import os
import uuid

import pytest
import schemathesis  # the test extra; hypothesis comes with it
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.integration

MAX_EXAMPLES = int(os.environ.get("POISONAUDIT_SCHEMATHESIS_EXAMPLES", "50"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def _operations() -> list[str]:
    """The operations' labels ("GET /v1/jobs/{job_id}"), from the app's OpenAPI (no database needed)."""
    from app.main import create_app

    schema = schemathesis.openapi.from_dict(create_app().openapi())
    return [r.ok().label for r in schema.get_all_operations()]


OPERATIONS = _operations()
NOTHING_YET = ("/artifacts/{name}", "/poisoned-set")  # a queued job has produced neither


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def stack(request, tmp_path_factory):
    """The app on one backend, migrated, with one team, its key (and a spare one to revoke) and the
    seeded objects' ids; its lifespan ends with the module."""
    from schemathesis.python import asgi

    from app.db import dispose_engines, session_scope
    from app.main import create_app
    from app.migrate import upgrade_schema
    from app.security import create_key, create_team
    from app.settings import get_settings

    env = {"DATA_DIR": str(tmp_path_factory.mktemp(request.param)), "REAPER_ENABLED": "false",
           "ENCODER_CHECK_WAIT_S": "0"}
    if request.param == "postgres":
        redis = request.getfixturevalue("redis_url")
        env |= {"DATABASE_URL": request.getfixturevalue("pg_databases")(), "BROKER_URL": redis,
                "RESULT_BACKEND": redis}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "STORAGE_BACKEND"):
            mp.delenv(f"POISONAUDIT_{k}", raising=False)
        for k, v in env.items():
            mp.setenv(f"POISONAUDIT_{k}", v)
        get_settings.cache_clear()
        s = get_settings()
        s.ensure_dirs()
        upgrade_schema(s.database_url)
        with session_scope() as session:
            team = create_team(session, f"fuzz-{uuid.uuid4().hex[:6]}")
            key, spare = create_key(session, team), create_key(session, team, name="revoked by the fuzzer")
        app = create_app()
        keyed = {"Authorization": f"Bearer {key}"}
        schemas = {"key": (_schema(app, keyed), keyed), "anonymous": (_schema(app, None), {})}
        yield schemas, _seed(app, team.id, keyed, spare)
        asgi.shutdown_lifespans()
        dispose_engines()
    get_settings.cache_clear()


def _seed(app, team_id, headers: dict[str, str], spare_key: str) -> dict[str, str]:
    """A ready encoder, a queued job and a queued audit of the team: path parameters that exist, so
    that reads, cancels and reports answer with real objects, not only 404s and 422s."""
    from fastapi.testclient import TestClient

    from app.db import session_scope
    from app.models import Encoder, EncoderStatus
    from app.security import parse_prefix

    with session_scope() as session:
        enc = Encoder(team_id=team_id, name="tiny", architecture="small_cnn",
                      spec={"arch": "small_cnn", "in_channels": 1, "width": 8}, source="upload",
                      status=EncoderStatus.ready, sha256="0" * 64, size=1)
        session.add(enc)
        session.flush()
        encoder_id = str(enc.id)
    client = TestClient(app)
    job = client.post("/v1/jobs", headers=headers, json={
        "encoder": encoder_id, "dataset": "digits", "attack": "feature_matching", "epsilon": 0.03,
        "params": {"gc_steps": 50, "fm_steps": 20, "rounds": 1}, "head": {"epochs": 30}})
    audit = client.post("/v1/audits", headers=headers, json={
        "encoder": encoder_id, "dataset": "digits", "name": "grid",
        "attacks": [{"name": "feature_matching", "params": {"fm_steps": 20}}],
        "epsilons": [0.03], "betas": [0.25], "seeds": [0], "head": {"epochs": 30}})
    assert job.status_code == audit.status_code == 202, (job.text, audit.text)
    return {"encoder_id": encoder_id, "job_id": job.json()["id"], "audit_id": audit.json()["id"],
            "dataset_id": "digits", "prefix": parse_prefix(spare_key), "name": "feature_matching"}


def _schema(app, headers: dict[str, str] | None):
    """With a key the generator leaves the security headers alone (else a made-up X-API-Key wins over it)."""
    config = schemathesis.Config.from_dict(
        {"generation": {"max-examples": MAX_EXAMPLES, "with-security-parameters": headers is None}})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


@pytest.mark.parametrize("auth", ["key", "anonymous"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation(stack, label, auth):
    schemas, known = stack
    schema, headers = schemas[auth]
    op = schema.find_operation_by_label(label)
    assert op is not None, label
    method, path = label.split(" ", 1)
    secured = bool(schema.raw_schema["paths"][path][method.lower()].get("security"))
    strategies = [op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)]
    names = [p.name for p in op.path_parameters]
    seeded = bool(names) and set(names) <= set(known)
    if seeded:  # also valid requests on the seeded objects
        strategies.append(op.as_strategy(GenerationMode.POSITIVE, path_parameters={n: known[n] for n in names}))
    statuses = []

    @FUZZ
    @given(case=st.one_of(strategies))
    def run(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS)  # raises on a failed check
        statuses.append(response.status_code)
        assert response.status_code < 500

    run()
    assert statuses, "no request was sent"
    if auth == "key":
        assert 401 not in statuses, statuses  # the key reached every operation
        if seeded and not path.endswith(NOTHING_YET):
            assert [s for s in statuses if s < 300], statuses  # the seeded objects were found
    elif secured:
        assert not [s for s in statuses if s < 300], statuses  # nothing succeeds without a key
