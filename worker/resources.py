"""Inputs of a job, fetched from the object store into the worker's local cache, and the
feature cache mirrored to the object store under ``cache/`` keys (by content hash), so
that every worker reuses what any worker computed."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from attacks.data import load_dataset
from attacks.encoders import META_FILE, WEIGHTS_FILE, EncoderSpec, load_encoder, save_encoder
from attacks.features import FeatureCache
from attacks.stage_cache import StageCache

from app.models import Dataset, Encoder
from app.settings import Settings, get_settings
from app.storage import ObjectNotFound, ObjectStore, encoder_key

log = logging.getLogger("worker")


def _fetch(store: ObjectStore, key: str, dest: Path) -> Path:
    """Downloads ``key`` to ``dest`` atomically, unless it is already there."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    os.close(fd)
    try:
        store.get_file(key, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def encoder_files(enc: Encoder) -> tuple[str, str]:
    """Object keys of an encoder in the engine's directory format."""
    return encoder_key(enc.team_id, enc.id, WEIGHTS_FILE), encoder_key(enc.team_id, enc.id, META_FILE)


def load_job_encoder(enc: Encoder, store: ObjectStore, settings: Settings):
    """The encoder, from the local cache when its files are there.

    Keyed by the encoder's id, not the checkpoint's content hash: two encoders may share
    weights but not their spec, preprocessing or provenance (encoder.json)."""
    weights_key, meta_key = encoder_files(enc)
    local = Path(settings.cache_dir) / "encoders" / str(enc.id)
    _fetch(store, weights_key, local / WEIGHTS_FILE)
    _fetch(store, meta_key, local / META_FILE)
    return load_encoder(local, max_bytes=settings.max_encoder_bytes)


def check_uploaded_encoder(enc: Encoder, store: ObjectStore, settings: Settings) -> dict:
    """Loads an uploaded checkpoint strictly against its spec (raises EncoderError with the
    reason) and stores it in the engine's directory format; returns the encoder.json content."""
    spec = EncoderSpec.from_json(enc.spec)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / ("checkpoint.safetensors" if enc.weights_format == "safetensors" else "checkpoint.pt")
        store.get_file(enc.weights_key, src)
        encoder = load_encoder(src, spec, max_bytes=settings.max_encoder_bytes)
        out = save_encoder(encoder, Path(tmp) / "encoder")
        return store_encoder_dir(enc, out, store)


def store_encoder_dir(enc: Encoder, directory: Path, store: ObjectStore) -> dict:
    weights_key, meta_key = encoder_files(enc)
    store.put_file(weights_key, directory / WEIGHTS_FILE)
    store.put_file(meta_key, directory / META_FILE, "application/json")
    return json.loads((directory / META_FILE).read_text())


def load_job_dataset(job_dataset: str, row: Dataset | None, store: ObjectStore, settings: Settings):
    """Built-in by name, server-side root by configured name, uploaded npz by content hash."""
    from app.datasets import dataset_limits

    if row is not None:
        path = _fetch(store, row.key, Path(settings.cache_dir) / "datasets" / f"{row.sha256}.npz")
        return load_dataset("npz", path, limits=dataset_limits(settings))
    root = settings.dataset_roots.get(job_dataset)
    if root is not None:
        return load_dataset(root.loader, root.path, limits=dataset_limits(settings))
    return load_dataset(job_dataset)


class MirroredFeatureCache(FeatureCache):
    """The engine's feature cache, backed by ``cache/features/<key>.safetensors`` in the
    object store: a local miss tries the store before computing, a computation is uploaded."""

    def __init__(self, directory: str | os.PathLike, store: ObjectStore | None):
        super().__init__(directory)
        self.store = store

    def _object_key(self, key: str) -> str:
        return f"cache/features/{key}.safetensors"

    def get_or_compute(self, key, compute):
        path = self.path_for(key)
        if self.store is not None and path is not None and key not in self._memory and not path.exists():
            try:
                _fetch(self.store, self._object_key(key), path)
                log.info("feature cache: %s from the object store", key[:12])
            except ObjectNotFound:
                pass
            except Exception as exc:  # the store is an optimisation here
                log.warning("feature cache: could not read %s from the object store: %s", key[:12], exc)
        existed = path is not None and path.exists()
        z = super().get_or_compute(key, compute)
        if self.store is not None and path is not None and not existed and path.exists():
            try:
                self.store.put_file(self._object_key(key), path)
            except Exception as exc:
                log.warning("feature cache: could not mirror %s: %s", key[:12], exc)
        return z


class MirroredStageCache(StageCache):
    """The engine's stage cache (clean head, GradPC target, GC features shared by the jobs of
    an audit), backed by ``cache/stages/<key>.safetensors`` in the object store: a miss in
    memory and on the local disk tries the store before computing; a computation is uploaded."""

    def __init__(self, directory, store: ObjectStore | None, memory: dict | None = None):
        super().__init__(directory, memory=memory)
        self.store = store

    @staticmethod
    def object_key(key: str) -> str:
        return f"cache/stages/{key}.safetensors"

    def _fetch_remote(self, key: str, path: Path) -> bool:
        if self.store is None:
            return False
        try:
            _fetch(self.store, self.object_key(key), path)
        except ObjectNotFound:
            return False
        log.info("stage cache: %s from the object store", key[:12])
        return True

    def _push_remote(self, key: str, path: Path) -> None:
        if self.store is not None:
            self.store.put_file(self.object_key(key), path)


# One memory layer per worker process, shared by the jobs it runs (bounded, LRU).
_STAGE_MEMORY: OrderedDict = OrderedDict()


def stage_cache(store: ObjectStore, settings: Settings | None = None) -> MirroredStageCache:
    """A per-job view (its own hit counters) of this process's stage cache."""
    settings = settings or get_settings()
    return MirroredStageCache(Path(settings.cache_dir), store if settings.cache_mirror else None, _STAGE_MEMORY)


def engine_cache_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir) / "engine"


def feature_cache(store: ObjectStore, settings: Settings | None = None) -> MirroredFeatureCache:
    settings = settings or get_settings()
    return MirroredFeatureCache(engine_cache_dir(settings), store if settings.cache_mirror else None)


def _local_files(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}


def pull_engine_cache(store: ObjectStore, settings: Settings) -> set[str]:
    """Before a job: the engine's other cached files (pre-trained decoders, ...) that another
    worker stored under ``cache/`` and this one lacks. Features are fetched lazily instead.
    Returns the local files present, for :func:`push_engine_cache`."""
    root = engine_cache_dir(settings)
    if settings.cache_mirror:
        have = _local_files(root)
        for key, _size in store.list("cache"):
            rel = key[len("cache/"):]
            if not rel.startswith(("features/", "stages/")) and rel not in have:  # those: lazily
                try:
                    _fetch(store, key, root / rel)
                except Exception as exc:
                    log.warning("cache: could not fetch %s: %s", key, exc)
    return _local_files(root)


def push_engine_cache(store: ObjectStore, settings: Settings, before: set[str]) -> None:
    """After a job: what the engine added to its cache directory goes to ``cache/<path>``."""
    if not settings.cache_mirror:
        return
    root = engine_cache_dir(settings)
    for rel in sorted(_local_files(root) - before):
        if rel.startswith("features/"):
            continue  # mirrored as they are computed
        try:
            store.put_file(f"cache/{rel}", root / rel)
        except Exception as exc:
            log.warning("cache: could not mirror %s: %s", rel, exc)
