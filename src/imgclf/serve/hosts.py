"""The allowed-host check (``imgclf serve --allowed-host``), as ASGI middleware."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class HostCheck:
    """Answer only requests whose Host header names an allowed host (any port):
    a server on loopback then cannot be reached from a web page through DNS
    rebinding. ``*`` allows any host."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host_name(host)
            if name not in self.allowed:
                response = JSONResponse({"error": f"Host '{host}' is not served here; use one of "
                                                  f"{', '.join(sorted(self.allowed))} (imgclf serve --allowed-host)"},
                                        status_code=400)  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The name in a Host header: 'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
