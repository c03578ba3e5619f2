"""The object store: local directory and S3-compatible (a real moto server process)."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from app.storage import LocalStore, ObjectNotFound, S3Store, check_key


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../b", "", "a/ b", "x" * 401, "a\\b"])
def test_keys_must_be_service_generated(key):
    with pytest.raises(ValueError):
        check_key(key)


def _exercise(store, tmp_path):
    data = b"poison" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    st = store.put_file("teams/t/jobs/j/poisoned_set.npz", src)
    assert (st.sha256, st.size) == (hashlib.sha256(data).hexdigest(), len(data))
    st2 = store.put_bytes("cache/features/abc.safetensors", b"z")
    assert st2.size == 1
    assert store.exists(st.key) and not store.exists("teams/t/jobs/j/nothing")
    out = tmp_path / "out.bin"
    store.get_file(st.key, out)
    assert out.read_bytes() == data
    assert b"".join(store.open(st.key)) == data
    assert store.list("teams") == [("teams/t/jobs/j/poisoned_set.npz", len(data))]
    assert [k for k, _ in store.list("cache")] == ["cache/features/abc.safetensors"]
    with pytest.raises(ObjectNotFound):
        store.get_file("teams/t/missing", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        list(store.open("teams/t/missing"))
    store.delete(st.key)
    assert not store.exists(st.key)
    store.ping()
    return data


def test_local_store(tmp_path):
    store = LocalStore(tmp_path / "objects")
    _exercise(store, tmp_path)
    assert store.presign("cache/features/abc.safetensors", "a", "b") is None
    assert store.local_path("cache/features/abc.safetensors").read_bytes() == b"z"


@pytest.mark.integration
def test_s3_store_against_a_real_server(s3_endpoint, configure, tmp_path):
    s = configure(storage_backend="s3", s3_endpoint_url=s3_endpoint, s3_bucket="unit-bucket", s3_create_bucket="true",
                  s3_access_key_id="test", s3_secret_access_key="test", s3_prefix="pfx", presign_expires_s=60)
    store = S3Store(s)
    data = _exercise(store, tmp_path)
    st = store.put_bytes("teams/t/jobs/j/result.json", data)
    url = store.presign(st.key, "result.json", "application/json")
    assert url.startswith(s3_endpoint) and "Expires=60" in url or "X-Amz-Expires=60" in url
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data
    assert "attachment" in r.headers.get("content-disposition", "")
    # objects live under the configured prefix
    assert store.client.list_objects_v2(Bucket="unit-bucket", Prefix="pfx/teams/")["KeyCount"] == 1
