"""The access log (``imgclf serve``; off with ``--quiet``): one line per request on stderr.

``POST /v1/predict 200 12.3 ms``: the method, the path as the client sent it (control
characters written ``\\xNN``, so a request cannot forge a line), the status answered
(``-`` when the client went away before an answer) and the milliseconds from the request's
arrival to the end of the answer. Pure ASGI middleware, outermost, so every answer of the
app is logged, the Host check's and CORS's included; uvicorn's own answers (a request it
cannot parse, a connection over the limit) never reach the app and are not in it.
"""

from __future__ import annotations

import re
import time
from typing import TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class AccessLog:
    def __init__(self, app: ASGIApp, stream: TextIO):
        self.app = app
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            self.write(f"{scope.get('method', '-')} {request_path(scope)} {status or '-'} {elapsed:.1f} ms")

    def write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: serving matters more than its log
            pass


def request_path(scope: Scope) -> str:
    """The path as the client sent it, printable on one line."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else scope.get("path", "")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path) or "/"
