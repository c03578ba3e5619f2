"""Downloads: a redirect to a presigned URL where the store offers one, else a stream."""

from __future__ import annotations

from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from app.models import Artifact
from app.problems import Problem
from app.storage import ObjectNotFound, ObjectStore


def download(store: ObjectStore, art: Artifact):
    filename = art.name
    url = store.presign(art.key, filename, art.content_type)
    if url:
        return RedirectResponse(url, status_code=307)
    headers = {"X-Content-SHA256": art.sha256}
    path = store.local_path(art.key)
    if path is not None:
        return FileResponse(path, media_type=art.content_type, filename=filename, headers=headers)
    try:
        chunks = store.open(art.key)
    except ObjectNotFound:
        raise Problem(404, f"artifact {art.name!r} is missing from the object store") from None
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    headers["Content-Length"] = str(art.size)
    return StreamingResponse(chunks, media_type=art.content_type, headers=headers)
