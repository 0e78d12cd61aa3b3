"""The access key: `Authorization: Bearer KEY` on /api/* and /metrics (compared in constant time), and the rule
that a server reachable from other machines has a key unless its user says otherwise.

    app.add_middleware(KeyMiddleware, key="s3cret")   # 401 + WWW-Authenticate on a missing or wrong key
    check_exposure(cfg)                               # RetrievalError: a public host with no key and no --no-auth

/healthz and the page stay open (the page asks for the key and sends it with every API call).
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from retrieval.errors import RetrievalError

from .engine import LOOPBACK, ServeConfig

PROTECTED = ("/api/", "/metrics")


class KeyMiddleware:
    """ASGI middleware: requests to PROTECTED paths need `Authorization: Bearer <key>`, else 401."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED) and not self._allowed(scope):
            answer = JSONResponse({"detail": "missing or wrong access key: send the header Authorization: Bearer KEY"},
                                  status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)


def check_exposure(cfg: ServeConfig) -> None:
    """RetrievalError when cfg binds a non-loopback host with no key, unless cfg.no_auth says so explicitly."""
    if cfg.host in LOOPBACK or cfg.api_key or cfg.no_auth:
        return
    raise RetrievalError(f"refusing to serve on {cfg.host} without an access key: anyone who can reach this machine "
                         "could search the index and see its images; give one with --api-key-file FILE, or pass "
                         "--no-auth to serve openly")
