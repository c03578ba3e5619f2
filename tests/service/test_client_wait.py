"""The client's wait survives a transient 503 (honouring Retry-After) and gives up on real errors."""

from __future__ import annotations

import uuid

import httpx
import pytest

from app.client import ApiError, Client

def test_wait_retries_a_transient_503_after_retry_after(monkeypatch):
    from app import client as mod
    from app.schemas import JobPublic

    jid = str(uuid.uuid4())
    sleeps = []
    monkeypatch.setattr(mod.time, "sleep", lambda s: sleeps.append(s))
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503, json={"title": "Service Unavailable", "detail": "db"}, headers={"Retry-After": "3"})
        return httpx.Response(200, json=_payload(jid))

    monkeypatch.setattr(JobPublic, "model_validate", classmethod(lambda cls, d: _Obj(d["status"])))
    c = Client("http://test", "k", transport=httpx.MockTransport(handler))
    assert c.wait_job(jid, poll_s=0.01).status == "succeeded"
    assert calls["n"] == 2 and sleeps == [3.0]


def test_wait_gives_up_on_a_real_error(monkeypatch):
    from app import client as mod

    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    c = Client("http://test", "k", transport=httpx.MockTransport(
        lambda r: httpx.Response(404, json={"title": "Not Found", "detail": "no such job"})))
    with pytest.raises(ApiError) as e:
        c.wait_job(str(uuid.uuid4()), poll_s=0.01)
    assert e.value.status == 404


def test_wait_gives_up_after_too_many_transient_answers(monkeypatch):
    from app import client as mod

    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    c = Client("http://test", "k", transport=httpx.MockTransport(lambda r: httpx.Response(503, json={"title": "x"})))
    with pytest.raises(ApiError) as e:
        c.wait_job(str(uuid.uuid4()), poll_s=0.01)
    assert e.value.status == 503


class _Obj:
    def __init__(self, status):
        self.status = status


def _payload(jid):
    return {"id": jid, "status": "succeeded"}


@pytest.mark.parametrize("answer", [
    httpx.Response(200, text="<html>a proxy's login page</html>"),
    httpx.Response(200, json={"id": "not-a-job"}),
    httpx.Response(200, json=[1, 2]),
])
def test_a_malformed_success_answer_is_a_server_fault_not_a_refusal(answer, capsys):
    """exit 3 (the server failed), with what was wrong; not 2 (the request was refused)."""
    from app.client import BadResponse
    from app.client_cli import EXIT_SERVER, run

    c = Client("http://test", "k", transport=httpx.MockTransport(lambda r: answer))
    with pytest.raises(BadResponse, match=r"GET /v1/jobs/.* answered HTTP 200 with a body that is not a JobPublic"):
        c.get_job(str(uuid.uuid4()))
    assert run(lambda args: c.get_job(str(uuid.uuid4())), None) == EXIT_SERVER
    assert "malformed server response" in capsys.readouterr().err


def test_cli_no_defences_reaches_the_request_body(monkeypatch):
    """`poisonaudit submit/audit --no-defences` send defences false; without it the field is left to the server."""
    import json as _json

    from app import client_cli
    from attacks.cli import main

    bodies = []

    def handler(request):
        bodies.append(_json.loads(request.content))
        return httpx.Response(503, json={"title": "Service Unavailable", "detail": "stop here"})

    monkeypatch.setattr(client_cli, "_client", lambda args: Client("http://test", "k", transport=httpx.MockTransport(handler)))
    enc = str(uuid.uuid4())
    for flags in ([], ["--no-defences"], ["--precision", "bf16"]):
        main(["submit", "--encoder", enc, "--dataset", "digits", "--attack", "gradpc", *flags])
        main(["audit", "--encoder", enc, "--dataset", "digits", "--attack", "gradpc", "--epsilon", "0.03", *flags])
    assert [b.get("defences") for b in bodies] == [None, None, False, False, None, None]
    assert [b.get("precision") for b in bodies] == [None, None, None, None, "bf16", "bf16"]
    keys = []
    monkeypatch.setattr(client_cli, "_client", lambda args: Client("http://test", "k", transport=httpx.MockTransport(
        lambda request: keys.append(request.headers.get("Idempotency-Key")) or httpx.Response(503, json={
            "title": "Service Unavailable", "detail": "stop here"}))))
    main(["audit", "--encoder", enc, "--dataset", "digits", "--attack", "gradpc", "--epsilon", "0.03",
          "--idempotency-key", "grid-7"])
    main(["audit", "--encoder", enc, "--dataset", "digits", "--attack", "gradpc", "--epsilon", "0.03"])
    assert keys == ["grid-7", None]
