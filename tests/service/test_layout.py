"""House rules that are cheap to check: the API never imports torch; the compose file and the
Dockerfile describe the deployment the issue asks for (parsed, since there is no Docker here)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from .helpers import REPO, clean_env


def test_api_process_never_imports_torch():
    code = ("import sys; from app.main import create_app; from fastapi.testclient import TestClient; "
            "import app.cli, app.serve, app.queue, app.metrics, app.reaper, worker.celery_app; a = create_app(); "
            "TestClient(a).get('/v1/attacks'); a.openapi(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    r = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_compose_file():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]
    assert {"api", "worker", "postgres", "redis", "minio", "migrate"} <= set(svc)
    for name in ("api", "postgres", "redis", "minio"):
        assert "test" in svc[name]["healthcheck"], name
    gpu = svc["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("api", "worker"):
        deps = svc[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy" and deps["redis"]["condition"] == "service_healthy"
    assert "migrate" in " ".join(svc["migrate"]["command"])
    env = {**_env(svc["api"]), **_env(svc["worker"])}
    assert env["POISONAUDIT_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["POISONAUDIT_BROKER_URL"].startswith("redis://")
    assert env["POISONAUDIT_STORAGE_BACKEND"] == "s3" and "minio" in env["POISONAUDIT_S3_ENDPOINT_URL"]
    assert "worker.celery_app" in " ".join(svc["worker"]["command"])


def _env(service):
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else dict(env)


def test_dockerfile_builds_api_and_worker_targets():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM python:3.11" in text
    assert "AS api" in text and "AS worker" in text
    assert "HEALTHCHECK" in text or "healthz" in text


def test_make_serve_installs_only_what_serving_needs():
    """`make serve` bootstraps the `serve` target (no test extras), `make test` the `test` one; a
    wrong target names the valid ones. (The installs themselves are proved from a fresh clone.)"""
    root = REPO
    plan = {t: subprocess.run(["make", "-n", t], cwd=root, capture_output=True, text=True).stdout for t in ("serve", "test")}
    assert "bootstrap.sh serve" in plan["serve"] and "[test]" not in plan["serve"] and "bootstrap.sh test" not in plan["serve"]
    assert "bootstrap.sh test" in plan["test"]
    script = (root / "scripts" / "bootstrap.sh").read_text()
    assert "serve) spec='.'" in script and "test) spec='.[test]'" in script
    r = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh"), "nope"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 2 and "serve" in r.stderr and "test" in r.stderr
