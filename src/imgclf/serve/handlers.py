"""How every error is answered: a JSON ``{"error": "..."}`` with its status, never a traceback.

:class:`HTTPError` is the server's own answer about the HTTP exchange (a body
too large or too slow, the wrong content type, a missing key). An
:class:`~imgclf.errors.ImgclfError` is answered with the ``http_status`` that
:mod:`imgclf.errors` gives it; Starlette's 404 and 405 and FastAPI's validation
errors are reworded into one line each; anything else is a 500 naming only the
exception's type.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgclf.errors import ImgclfError


class HTTPError(Exception):
    """An error answered as ``{"error": message}``; ``close`` ends the connection
    (the body was not read to its end, so the connection cannot be reused)."""

    def __init__(self, status: int, message: str, *, close: bool = False, headers: dict | None = None):
        self.status, self.message = status, message
        self.headers = {**(headers or {}), **({"Connection": "close"} if close else {})}


async def http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def imgclf_error(request: Request, exc: ImgclfError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.http_status)


async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    if exc.status_code == 404:
        message = f"no such endpoint: {path}; the API is described at /docs"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
        problems.append(
            f"{where}: {e.get('msg', 'invalid')}" + (f" (got {str(e['input'])[:40]!r})" if "input" in e else "")
        )
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


#: What ``create_app`` registers: each kind of exception and how it is answered.
EXCEPTION_HANDLERS = {
    HTTPError: http_error,
    ImgclfError: imgclf_error,
    StarletteHTTPException: starlette_error,
    RequestValidationError: invalid_request,
    Exception: unexpected_error,
}
