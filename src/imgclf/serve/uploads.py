"""Reading a request's images within the limits.

The Content-Length is checked before anything is read; the body is read with a
size cap (413 as soon as it passes the limit) and a timeout (408 when it stops
arriving); a multipart body is parsed with a cap on files and fields, and one that
cannot be parsed (cut short before its closing boundary, say) is 400.
"""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

from imgclf.serve.handlers import HTTPError
from imgclf.serve.limits import MIN_BODY_RATE, BodyShare, BudgetFull


def declared_length(request: Request, limit: int) -> int | None:
    """The Content-Length, refused at once if it is not a number or over ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        raise HTTPError(400, f"Content-Length '{declared}' is not a number", close=True)
    if int(declared) > limit:
        raise HTTPError(413, f"request is {int(declared):,} bytes; the limit is {limit:,}", close=True)
    return int(declared)


async def read_body(
    request: Request, declared: int | None, limit: int, timeout: float, share: BodyShare, min_rate: float = MIN_BODY_RATE
) -> bytes:
    """The body, held in ``share`` as it arrives: refused with 413 as soon as it passes
    ``limit`` bytes, with 408 if nothing arrives for ``timeout`` seconds (a body shorter
    than its Content-Length) or if, after ``timeout`` seconds, it averages under
    ``min_rate`` bytes a second, and with 503 when the server has no room for it."""
    chunks, size = [], 0
    stream = request.stream()
    started = time.monotonic()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), timeout)
        except StopAsyncIteration:
            break
        except (asyncio.TimeoutError, TimeoutError):
            of = f" of {declared:,}" if declared is not None else ""
            raise HTTPError(408, f"request body stopped arriving: nothing for {timeout:g} s after "
                                 f"{size:,}{of} bytes", close=True) from None  # fmt: skip
        except ClientDisconnect:
            raise HTTPError(400, "client disconnected before sending the whole body", close=True) from None
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request is larger than the {limit:,}-byte limit", close=True)
        elapsed = time.monotonic() - started
        if elapsed > timeout and size < min_rate * elapsed:
            raise HTTPError(408, f"request body arriving too slowly: {size:,} bytes in {elapsed:.0f} s (at least "
                                 f"{min_rate / 1024:g} KiB/s after the first {timeout:g} s)", close=True)  # fmt: skip
        try:
            await share.grow(len(chunk))
        except BudgetFull:
            raise HTTPError(503, "the server is busy receiving other uploads; retry in a few seconds",
                            close=True, headers={"Retry-After": "5"}) from None  # fmt: skip
        chunks.append(chunk)
    return b"".join(chunks)


def multipart_boundary(content_type: str) -> bytes:
    """The ``boundary`` parameter of a multipart Content-Type, or 400 without one."""
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1", "replace")
    raise HTTPError(400, "malformed multipart body: its Content-Type names no boundary")


def check_complete(body: bytes, boundary: bytes) -> None:
    """400 unless the multipart ``body`` has its closing delimiter (``--BOUNDARY--``): a body
    cut short parses as an empty form, which would read as "no image" (422)."""
    close = b"--" + boundary + b"--"
    if not (body.startswith(close) or b"\r\n" + close in body):
        shown = boundary.decode("latin-1")
        raise HTTPError(400, f"malformed multipart body: it ends before its closing boundary --{shown}-- "
                             "(was the upload cut short?)")  # fmt: skip


async def parse_multipart(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """Each uploaded file of a multipart ``body`` (already read) as ``(file name, bytes)``.

    A body that cannot be parsed (cut short, no boundary, a broken part) is 400; one
    with more than ``max_files`` files or fields is 413."""
    from starlette.formparsers import MultiPartException

    check_complete(body, multipart_boundary(request.headers.get("content-type", "")))

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        form = await replay.form(max_files=max_files, max_fields=max_files)
    except (MultiPartException, StarletteHTTPException) as e:  # Starlette wraps the first in the second
        problem = str(getattr(e, "detail", None) or e)
        if problem.startswith("Too many files"):
            raise HTTPError(413, f"a request may carry at most {max_files} files; "
                                 "send the others in further requests") from None  # fmt: skip
        if problem.startswith("Too many fields"):
            raise HTTPError(413, f"a request may carry at most {max_files} form fields") from None
        raise HTTPError(400, f"malformed multipart body ({problem})") from None
    except Exception as e:
        raise HTTPError(400, f"malformed multipart body ({type(e).__name__})") from None
    uploads = []
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            uploads.append((value.filename or key, await value.read()))
    await form.close()
    return uploads
