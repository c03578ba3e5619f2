"""Upload limits enforced while the body streams in (413 before it is all read)."""

from __future__ import annotations

from app.problems import Problem


class _TooLarge(Exception):
    pass


class UploadLimitMiddleware:
    """Pure ASGI: refuses a POST body over the limit for its path, by Content-Length when
    given and by counting otherwise. Limits come from a callable so settings stay swappable."""

    def __init__(self, app, limits):
        self.app = app
        self.limits = limits  # () -> {path: max bytes}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.limits().get(scope["path"].rstrip("/"))
        if limit is None:
            return await self.app(scope, receive, send)
        slack = 1 << 20  # multipart framing and form fields around the file
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit + slack:
            return await self._reject(scope, send, limit)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit + slack:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, send, limit)

    async def _reject(self, scope, send, limit):
        from app.problems import problem_response

        resp = problem_response(Problem(413, f"upload exceeds the limit of {limit} bytes", headers={"Connection": "close"}))
        await resp(scope, None, send)
