"""The app's HTTP middlewares: CORS (vLLM's flags and defaults), the request-body limit (413)
and the API key (401)."""
from __future__ import annotations

import dataclasses
import hmac

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxpaged.serve.errors import error_response


@dataclasses.dataclass
class CORS:
    """`--allowed-origins`, `--allowed-methods`, `--allowed-headers`, `--allow-credentials`."""
    allowed_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


def add_middlewares(app: Starlette, api_key: str | None, max_body: int | None, cors: CORS | None) -> None:
    """Outermost first: CORS (a preflight needs no key), the body limit, the key."""
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if max_body is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_body)
    cors = cors or CORS()
    app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                       allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials)


class BodySizeLimit:
    """Request bodies over `max_bytes` get 413 before they are read whole or parsed: at once
    from Content-Length, else as soon as the received chunks pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(self._message(), 413)(scope, receive, send)


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on `/v1` routes (vLLM's rule); else 401 in OpenAI's body."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, b"Bearer " + self.key):
                response = error_response("Invalid or missing API key", 401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
