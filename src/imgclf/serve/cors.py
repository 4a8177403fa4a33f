"""CORS (``imgclf serve --cors-origin``): Starlette's middleware, refusing a preflight in JSON.

Starlette answers a preflight it refuses with a plain-text ``400 Disallowed CORS origin``;
:class:`CORS` answers the same status and headers with ``{"error": ...}`` saying what was
refused and what is allowed, as every other error of the API.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response


class CORS(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("utf-8", "replace").removeprefix("Disallowed CORS ").split(", ")
        reasons = []
        if "origin" in refused:
            reasons.append(f"origin '{request_headers.get('origin', '')}' may not call this API "
                           "(imgclf serve --cors-origin names those that may)")  # fmt: skip
        if "method" in refused:
            method = request_headers.get("access-control-request-method", "")
            reasons.append(f"method '{method}' is not allowed; use {' or '.join(sorted(self.allow_methods))}")
        if "headers" in refused:
            asked = request_headers.get("access-control-request-headers", "")
            reasons.append(f"headers '{asked}' are not all allowed; allowed: {', '.join(sorted(self.allow_headers))}")
        if "private-network" in refused:
            reasons.append("private-network access is not allowed")
        message = "CORS preflight refused: " + ("; ".join(reasons) or ", ".join(refused))
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)
