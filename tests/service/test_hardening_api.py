"""Issue 13, items 2, 3 and 8 (and issue 15's safetensors detection): checkpoints are walked in time
linear in their pickle, with a budget, and every failure is a 422; the API key is checked before a
body is read and JSON bodies are capped (413); over-limit chunked uploads are 413; keys can be
listed and revoked (API and CLI); the OpenAPI declares the error responses."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest

from .test_api import _job_body, _problem


# ------------------------------------------------------------------ checkpoints (item 2)
def _torch_zip(raw_pickle: bytes) -> bytes:
    """A zip laid out like torch.save's, around a hand-made pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", raw_pickle)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def _upload(client, h, data: bytes):
    return client.post("/v1/encoders", data={"architecture": "small_cnn"},
                       files={"file": ("ckpt.pt", io.BytesIO(data))}, headers=h)


def _doubling_lists(k: int) -> bytes:
    """L_0 = [], L_i = [L_{i-1}, L_{i-1}] (shared through the memo): 2**k paths in about 5k bytes."""
    import pickle

    x: list = []
    for _ in range(k):
        x = [x, x]
    return pickle.dumps({"w": x}, protocol=2)


def test_hostile_pickles_are_422_not_500_nor_exponential(client, team_a):
    _, h = team_a
    self_ref = b"\x80\x02]q\x00h\x00a."  # a list that contains itself
    n = 200_000
    deep = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."  # 200,000 nested lists
    for raw, words in ((self_ref, "no tensors"), (deep, "nesting too deep"), (_doubling_lists(60), "no tensors")):
        p = _problem(_upload(client, h, _torch_zip(raw)), 422)
        assert p["errors"][0]["field"] == "file" and words in p["detail"], p["detail"]
    for raw in (b"\x80\x02}q\x00(X\x01\x00\x00\x00a", b"\x80\x02c__builtin__\neval\n"):  # truncated; a forbidden global
        _problem(_upload(client, h, _torch_zip(raw)), 422)


def test_shared_containers_are_walked_once(tmp_path):
    """Each container is visited once: a tensor under 2**16 paths of shared lists is named by the first."""
    import torch

    from app.checkpoints import inspect_checkpoint

    x = torch.zeros(3)
    for _ in range(16):
        x = [x, x]
    torch.save({"w": x, "b": torch.zeros(2)}, tmp_path / "shared.pt")
    info = inspect_checkpoint(tmp_path / "shared.pt")
    assert info.format == "torch"
    assert info.tensors == {"w" + ".0" * 16: (3,), "w" + ".0" * 15 + ".1": (3,), "b": (2,)}


def test_the_node_budget_refuses_large_pickles(tmp_path, monkeypatch):
    import torch

    from app import checkpoints
    from app.checkpoints import CheckpointError, inspect_checkpoint

    torch.save({f"w{i}": torch.zeros(1) for i in range(200)}, tmp_path / "many.pt")
    assert len(inspect_checkpoint(tmp_path / "many.pt").tensors) == 200
    monkeypatch.setattr(checkpoints, "MAX_PICKLE_NODES", 100)
    with pytest.raises(CheckpointError, match="too large or too intricate"):
        inspect_checkpoint(tmp_path / "many.pt")


class _SharedSet:
    """Pickles as set(L) with one list L shared through the memo: each set costs a few bytes."""

    items = list(range(1000))

    def __reduce__(self):
        return set, (self.items,)


def test_the_budget_counts_what_the_stubs_build(tmp_path):
    """2,000 sets built from one shared 1,000-item list: 2 million items from a pickle of about 10 KB."""
    import torch

    from app.checkpoints import CheckpointError, inspect_checkpoint

    torch.save({"w": torch.zeros(1), "junk": [_SharedSet() for _ in range(2000)]}, tmp_path / "sets.pt")
    assert (tmp_path / "sets.pt").stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="too large or too intricate"):
        inspect_checkpoint(tmp_path / "sets.pt")


def _safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    if length is not None:
        raw = raw.ljust(length, b" ")  # safetensors pads its header with spaces
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_whose_header_length_starts_with_0x80_is_accepted(client, configure, team_a, tmp_path):
    """Issue 15: a ResNet-50's safetensors header is 0x7080 bytes long; its first byte is the 0x80 of a
    legacy pickle. The crafted file here has a 0x180-byte header."""
    import torch

    from app.checkpoints import CheckpointError, inspect_checkpoint

    data = _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), length=0x180)
    assert data[0] == 0x80
    path = tmp_path / "enc.safetensors"
    path.write_bytes(data)
    info = inspect_checkpoint(path)
    assert info.format == "safetensors" and info.tensors == {"w": (2,)}
    configure(encoder_check_wait_s=0)
    _, h = team_a
    r = client.post("/v1/encoders", data={"architecture": "small_cnn"},
                    files={"file": ("enc.safetensors", io.BytesIO(data))}, headers=h)
    assert r.status_code == 202, r.text
    # a real legacy pickle is still refused as one
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        inspect_checkpoint(tmp_path / "legacy.pt")


@pytest.mark.parametrize("header", [
    {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},  # unhashable dtype
    {"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},  # shape not a list
    {"w": "F32"},
])
def test_malformed_safetensors_headers_are_refused(tmp_path, header):
    from app.checkpoints import CheckpointError, inspect_checkpoint

    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors(header, bytes(8)))
    with pytest.raises(CheckpointError):
        inspect_checkpoint(path)


def test_deeply_nested_safetensors_header_is_refused(tmp_path):
    from app.checkpoints import CheckpointError, inspect_checkpoint

    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="JSON"):
        inspect_checkpoint(path)


# ------------------------------------------------------------------ auth before the body, JSON cap (item 3)
def _asgi(app, method: str, path: str, headers: dict[str, str] | None = None, chunks=(), length: bool = False):
    """Calls the ASGI app directly with a body sent in ``chunks`` (chunked unless ``length``), and
    returns (status, response body, how many chunks the app pulled)."""
    import anyio

    chunks = list(chunks)
    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if length:
        hdrs.append((b"content-length", str(sum(len(c) for c in chunks)).encode()))
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        if not chunks and pulled == 0:
            pulled = -1  # an empty body, delivered once (not counted)
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": hdrs, "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, max(pulled, 0)


def _multipart(field: str, filename: str, data: bytes, boundary: str = "xYzZy") -> tuple[dict[str, str], bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


MiB = 2**20


def test_anonymous_bodies_are_refused_unread(api, team_a, ready_encoder):
    """No key, a wrong key or a revoked one: 401 before the app pulls one chunk of a 50 MB body."""
    json_h = {"content-type": "application/json"}
    big = [b" " * MiB] * 50
    for auth in ({}, {"authorization": "Bearer pa_000000000000_wrong"}, {"x-api-key": "nope"}):
        for path in ("/v1/jobs", "/v1/audits", "/v1/encoders"):
            status, body, pulled = _asgi(api, "POST", path, {**json_h, **auth}, big)
            assert (status, pulled) == (401, 0), (path, auth, body[:200])
            assert json.loads(body)["status"] == 401
        mp_h, mp = _multipart("file", "d.npz", b"\0" * (4 * MiB))
        status, _, pulled = _asgi(api, "POST", "/v1/datasets", {**mp_h, **auth}, [mp[i:i + MiB] for i in range(0, len(mp), MiB)])
        assert (status, pulled) == (401, 0)
    # the same request with the team's key is read and accepted
    _, h = team_a
    body = json.dumps(_job_body(ready_encoder.id)).encode()
    status, out, pulled = _asgi(api, "POST", "/v1/jobs", {**json_h, "authorization": h["Authorization"]}, [body])
    assert status == 202 and pulled == 1, out[:300]


def test_revoked_key_is_refused_before_the_body(api, session, team_a):
    from datetime import datetime, timezone

    from sqlalchemy import select

    from app.models import ApiKey

    team, h = team_a
    session.scalar(select(ApiKey).where(ApiKey.team_id == team.id)).revoked_at = datetime.now(timezone.utc)
    session.commit()
    status, _, pulled = _asgi(api, "POST", "/v1/jobs", {"content-type": "application/json", "authorization": h["Authorization"]},
                              [b"{}"] * 3)
    assert (status, pulled) == (401, 0)


def test_anonymous_callers_still_get_404_405_and_public_routes(client):
    _problem(client.post("/v1/nothing-here", json={"a": 1}), 404)
    _problem(client.post("/v1/jobs/00000000-0000-0000-0000-000000000000/nothing", json={}), 404)
    _problem(client.put("/v1/jobs", json={}), 405)
    _problem(client.post("/v1/attacks", json={}), 405)
    assert client.get("/v1/attacks").status_code == 200 and client.get("/healthz").status_code == 200
    p = _problem(client.post("/v1/jobs", json={}), 401)
    assert "API key" in p["detail"]
    assert client.post("/v1/jobs", json={}).headers["www-authenticate"] == "Bearer"


def test_json_bodies_are_capped(api, client, configure, team_a, ready_encoder, tiny_encoder_dir):
    """POISONAUDIT_MAX_JSON_BYTES: 413 beyond it, by Content-Length and while streaming; uploads keep their own limits."""
    configure(max_json_bytes=2000, encoder_check_wait_s=0)
    _, h = team_a
    auth = {"content-type": "application/json", "authorization": h["Authorization"]}
    padded = json.dumps(_job_body(ready_encoder.id, name="x" * 3000)).encode()
    for length in (True, False):
        status, body, pulled = _asgi(api, "POST", "/v1/jobs", auth, [padded[i:i + 500] for i in range(0, len(padded), 500)], length)
        assert status == 413, body[:300]
        assert json.loads(body)["status"] == 413 and "2000" in json.loads(body)["detail"]
        assert pulled == (0 if length else 5)  # refused at its Content-Length, or at the chunk that crosses the cap
    pretrain = {"name": "p" * 3000, "architecture": "small_cnn", "dataset": "digits"}
    _problem(client.post("/v1/encoders", json=pretrain, headers=h), 413)
    _problem(client.post("/v1/audits", content=b"[" + b" " * 3000 + b"]", headers={**h, "content-type": "application/json"}), 413)
    # under the cap: read as before
    assert client.post("/v1/jobs", json=_job_body(ready_encoder.id), headers=h).status_code == 202
    # a checkpoint upload far over the JSON cap is under its own limit
    with open(tiny_encoder_dir / "encoder.safetensors", "rb") as f:
        assert f.seek(0, 2) > 2000
        f.seek(0)
        r = client.post("/v1/encoders", data={"architecture": "small_cnn", "spec": json.dumps({"in_channels": 1, "width": 8})},
                        files={"file": ("e.safetensors", f)}, headers=h)
    assert r.status_code == 202, r.text


def test_json_cap_default_is_one_mebibyte(configure):
    assert configure().max_json_bytes == MiB


def test_database_down_when_authenticating_first_is_503(configure, queue, store):
    from app.db import dispose_engines
    from app.main import create_app
    from app.queue import get_queue
    from app.storage import get_store

    configure(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    app = create_app()
    app.dependency_overrides[get_queue] = lambda: queue
    app.dependency_overrides[get_store] = lambda: store
    try:
        status, body, pulled = _asgi(app, "POST", "/v1/jobs", {"content-type": "application/json",
                                                                "authorization": "Bearer pa_000000000000_x"}, [b"{}"])
        assert (status, pulled) == (503, 0) and "retry" in json.loads(body)["detail"]
    finally:
        dispose_engines()


# ------------------------------------------------------------------ status codes (item 8)
def test_chunked_upload_over_the_limit_is_413(api, configure, team_a):
    """A chunked dataset upload (no Content-Length) over the limit was a 400 (FastAPI's 'error parsing the body')."""
    configure(max_dataset_bytes=1000, max_encoder_bytes=1000)
    _, h = team_a
    mp_h, mp = _multipart("file", "big.npz", b"\0" * (3 * MiB))
    chunks = [mp[i:i + 256 * 1024] for i in range(0, len(mp), 256 * 1024)]
    for path in ("/v1/datasets", "/v1/encoders"):
        status, body, pulled = _asgi(api, "POST", path, {**mp_h, "authorization": h["Authorization"]}, chunks)
        assert status == 413, (path, body[:300])
        p = json.loads(body)
        assert p["status"] == 413 and "1000" in p["detail"]
        assert pulled < len(chunks)  # refused while streaming, not after


def test_every_route_that_needs_a_key_checks_it_before_the_body():
    from fastapi.routing import APIRoute

    from app.deps import KeyFirstRoute, needs_key
    from app.routers import attacks, audits, datasets, encoders, health, jobs, keys

    keyed = 0
    for module in (attacks, audits, datasets, encoders, health, jobs, keys):
        for route in module.router.routes:
            if isinstance(route, APIRoute) and needs_key(route):
                keyed += 1
                assert isinstance(route, KeyFirstRoute), (module.__name__, route.path)
    assert keyed >= 17


def test_json_bodies_that_are_not_utf8_are_422(client, team_a, ready_encoder):
    """Invalid UTF-8 in a JSON body was FastAPI's undocumented 400 ('error parsing the body'; found by
    tests/service/test_schemathesis.py); now the 422 of any malformed JSON. Valid bodies still pass."""
    _, h = team_a
    bad = b'{"name": "\xff\xfe\xfa", "attack": "feature_matching"}'
    for path in ("/v1/jobs", "/v1/audits"):
        for ctype in ("application/json", "application/merge-patch+json", None):
            headers = {**h, **({"content-type": ctype} if ctype else {})}
            p = _problem(client.post(path, content=bad, headers=headers), 422)
            assert p["errors"] == [{"field": "body", "message": "JSON decode error: the body is not UTF-8 text"}], p
        # malformed but decodable JSON: FastAPI's own 422, as before
        assert _problem(client.post(path, content=b'{"name": ', headers={**h, "content-type": "application/json"}), 422)
    # UTF-16 with its BOM is JSON that json.loads reads: not refused by the check
    body = json.dumps(_job_body(ready_encoder.id)).encode("utf-16")
    r = client.post("/v1/jobs", content=body, headers={**h, "content-type": "application/json"})
    assert r.status_code == 202, r.text
    # the key is still checked first
    assert _problem(client.post("/v1/jobs", content=bad, headers={"content-type": "application/json"}), 401)


# ------------------------------------------------------------------ key revocation (item 8)
def _prefix(headers: dict[str, str]) -> str:
    from app.security import parse_prefix

    return parse_prefix(headers["Authorization"].split()[1])


def test_a_team_lists_and_revokes_its_own_keys(client, session, team_a, team_b):
    from app.security import create_key

    team, h = team_a
    _, hb = team_b
    listed = client.get("/v1/keys", headers=h)
    assert listed.status_code == 200 and listed.json()["count"] == 1
    assert listed.json()["data"][0]["prefix"] == _prefix(h) and listed.json()["data"][0]["revoked_at"] is None
    secret = h["Authorization"].split()[1]
    assert secret not in listed.text and "hash" not in listed.text
    # another team's key does not exist for team B, and stays live
    _problem(client.delete(f"/v1/keys/{_prefix(h)}", headers=hb), 404)
    _problem(client.delete("/v1/keys/000000000000", headers=h), 404)
    assert client.get("/v1/jobs", headers=h).status_code == 200
    # a second key of team A, revoked by the first: refused at once, listed as revoked
    second = create_key(session, team, "ci")
    session.commit()
    h2 = {"Authorization": f"Bearer {second}"}
    assert client.get("/v1/jobs", headers=h2).status_code == 200
    r = client.delete(f"/v1/keys/{_prefix(h2)}", headers=h)
    assert r.status_code == 204 and r.content == b""
    _problem(client.get("/v1/jobs", headers=h2), 401)
    _problem(client.post("/v1/jobs", json={}, headers=h2), 401)
    keys = {k["prefix"]: k for k in client.get("/v1/keys", headers=h).json()["data"]}
    assert keys[_prefix(h2)]["revoked_at"] is not None and keys[_prefix(h2)]["name"] == "ci"
    first_revoked = keys[_prefix(h2)]["revoked_at"]
    assert client.delete(f"/v1/keys/{_prefix(h2)}", headers=h).status_code == 204  # twice: harmless, same time
    assert {k["prefix"]: k for k in client.get("/v1/keys", headers=h).json()["data"]}[_prefix(h2)]["revoked_at"] == first_revoked
    # a key may revoke itself
    assert client.delete(f"/v1/keys/{_prefix(h)}", headers=h).status_code == 204
    _problem(client.get("/v1/keys", headers=h), 401)
    _problem(client.get("/v1/keys"), 401)


def test_cli_revoke_key(configure, capsys):
    from app.cli import main
    from app.db import dispose_engines, new_session
    from app.security import authenticate, parse_prefix

    configure()
    try:
        assert main(["create-team", "ops", "--with-key"]) == 0
        key = capsys.readouterr().out.split("shown once): ")[1].strip()
        assert main(["create-team", "other"]) == 0
        prefix = parse_prefix(key)
        with new_session() as s:
            assert authenticate(s, key) is not None
        assert main(["revoke-key", prefix, "--team", "other"]) == 2  # not that team's key
        assert "no API key" in capsys.readouterr().err
        assert main(["revoke-key", "000000000000"]) == 2
        with new_session() as s:
            assert authenticate(s, key) is not None
        assert main(["revoke-key", prefix, "--team", "ops"]) == 0
        assert capsys.readouterr().out.strip() == f"revoked key {prefix} of team ops"
        with new_session() as s:
            assert authenticate(s, key) is None
        assert main(["revoke-key", key]) == 0  # the whole key works too; revoking again is harmless
    finally:
        dispose_engines()


# ------------------------------------------------------------------ OpenAPI (item 8)
def test_openapi_declares_the_error_responses(client):
    paths = client.get("/openapi.json").json()["paths"]
    expected = {("/v1/jobs", "post"): {401, 413, 422}, ("/v1/audits", "post"): {401, 413, 422},
                ("/v1/encoders", "post"): {400, 401, 413, 415, 422}, ("/v1/datasets", "post"): {400, 401, 413, 422},
                ("/v1/keys", "get"): {401}, ("/v1/keys/{prefix}", "delete"): {401, 404}}
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        for code in codes:
            entry = responses[str(code)]
            assert "application/problem+json" in entry["content"], (path, method, code)
            assert entry["content"]["application/problem+json"]["schema"]["$ref"].endswith("/ProblemDetail")
    assert "POISONAUDIT_MAX_JSON_BYTES" in paths["/v1/jobs"]["post"]["responses"]["413"]["description"]
