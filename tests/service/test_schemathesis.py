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

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402  (comes with schemathesis)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance  # noqa: E402

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


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def stack(request, tmp_path_factory):
    """The app on one backend, migrated, with one team and its key; its lifespan ends with the module."""
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
            key = create_key(session, create_team(session, f"fuzz-{uuid.uuid4().hex[:6]}"))
        app = create_app()
        keyed = {"Authorization": f"Bearer {key}"}
        schemas = {"key": (_schema(app, keyed), keyed), "anonymous": (_schema(app, None), {})}
        yield schemas
        asgi.shutdown_lifespans()
        dispose_engines()
    get_settings.cache_clear()


def _schema(app, headers: dict[str, str] | None):
    """With a key the generator leaves the security headers alone (else a made-up X-API-Key wins over it)."""
    config = schemathesis.Config.from_dict(
        {"generation": {"max-examples": MAX_EXAMPLES, "with-security-parameters": headers is None}})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


@pytest.mark.parametrize("auth", ["key", "anonymous"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation(stack, label, auth):
    schema, headers = stack[auth]
    op = schema.find_operation_by_label(label)
    assert op is not None, label
    method, path = label.split(" ", 1)
    secured = bool(schema.raw_schema["paths"][path][method.lower()].get("security"))
    statuses = []

    @FUZZ
    @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)))
    def run(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS)  # raises on a failed check
        statuses.append(response.status_code)
        assert response.status_code < 500

    run()
    assert statuses, "no request was sent"
    if auth == "key":
        assert 401 not in statuses, statuses  # the key reached every operation
    elif secured:
        assert not [s for s in statuses if s < 300], statuses  # nothing succeeds without a key
