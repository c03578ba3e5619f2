"""Body limits enforced while the body streams in (413 before it is all read), for uploads and for
JSON requests. The API key is checked before a body is read too: :class:`app.deps.KeyFirstRoute`."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse

from app.problems import PROBLEM_JSON, Problem

UPLOAD_SLACK = 1 << 20  # multipart framing and form fields around an uploaded file


class _TooLarge(Exception):
    pass


async def _send_problem(scope, send, p: Problem) -> None:
    resp = JSONResponse(p.body(scope.get("path")), status_code=p.status, media_type=PROBLEM_JSON, headers=p.headers)
    await resp(scope, None, send)


# ------------------------------------------------------------------ 413
class BodyLimitMiddleware:
    """Pure ASGI: refuses a request body over its limit, by Content-Length when given and by counting
    otherwise (chunked). A multipart upload to an upload path has that path's limit (plus slack for
    the framing); any other body, JSON above all, has ``json_limit``. Limits come from callables so
    settings stay swappable. Whatever the app makes of a body cut short (FastAPI: a 400), the answer
    is the 413."""

    def __init__(self, app, uploads: Callable[[], dict[str, int]], json_limit: Callable[[], int]):
        self.app = app
        self.uploads = uploads  # () -> {path: max bytes}
        self.json_limit = json_limit  # () -> max bytes

    def _limit(self, scope) -> tuple[int, Problem]:
        headers = dict(scope.get("headers") or [])
        upload = self.uploads().get(scope["path"].rstrip("/"))
        if upload is not None and headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            return upload + UPLOAD_SLACK, Problem(413, f"upload exceeds the limit of {upload} bytes",
                                                  headers={"Connection": "close"})
        limit = self.json_limit()
        return limit, Problem(413, f"request body exceeds the limit of {limit} bytes (POISONAUDIT_MAX_JSON_BYTES)",
                              headers={"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, refusal = self._limit(scope)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_problem(scope, send, refusal)
        seen = 0
        exceeded = started = replaced = False

        async def counting_receive():
            nonlocal seen, exceeded
            if exceeded:
                raise _TooLarge()
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started, replaced
            if replaced:
                return
            if exceeded and message["type"] == "http.response.start" and not started:
                replaced = started = True  # the app's answer to a body it could not read: the 413 instead
                return await _send_problem(scope, send, refusal)
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _send_problem(scope, send, refusal)
