"""The answers uvicorn gives itself, before the app sees a request, as JSON ``{"error": ...}``.

uvicorn parses HTTP (with h11, or httptools where it is installed) and answers on its own
in two cases: a request it cannot parse (a Content-Length that is not a number, a broken
request line or header) gets ``400 Invalid HTTP request received.`` and a connection over
its concurrency limit gets ``503 Service Unavailable``, both plain text. :func:`protocol_class`
is the HTTP protocol uvicorn would pick, with those two answers in the API's JSON form:
the 400 is written instead of uvicorn's (the connection is then closed, as uvicorn does),
and the concurrency check moves into the app in front of it, counting as uvicorn counts.
"""

from __future__ import annotations

import json
import logging
from functools import cache

#: What a request uvicorn cannot parse is told (its parser's own reason is not passed on).
MALFORMED = (
    "malformed HTTP request: its request line, a header or the Content-Length cannot be read; the connection is closed"
)
#: What a connection over the limit is told.
BUSY = "the server has as many connections as it serves at once; retry in a few seconds"


def json_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


@cache
def protocol_class() -> type:
    """uvicorn's own HTTP protocol (``auto``: httptools if installed, else h11), answering
    in JSON where it answers by itself."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JSONErrorProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            limit, self.limit_concurrency = self.limit_concurrency, None
            if limit is not None:
                self.app = _limited(self.app, limit, self.server_state)

        def send_400_response(self, msg: str) -> None:
            body = json_body(MALFORMED)
            head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))  # fmt: skip
            self.transport.write(head + body)
            self.transport.close()

    return JSONErrorProtocol


def _limited(app, limit: int, server_state):
    """``app`` behind uvicorn's concurrency check (``limit_concurrency``), answering 503 in JSON.

    uvicorn checks before it starts the request's task; here the task is running and counted,
    hence ``>`` for tasks where uvicorn has ``>=``. Connections are counted alike."""

    async def limited(scope, receive, send) -> None:
        if scope["type"] == "http" and (len(server_state.connections) >= limit or len(server_state.tasks) > limit):
            logging.getLogger("uvicorn.error").warning("Exceeded concurrency limit.")  # as uvicorn logs it
            body = json_body(BUSY)
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                                    (b"retry-after", b"5")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await app(scope, receive, send)

    return limited
