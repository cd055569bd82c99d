"""HTTP pieces shared by our routers (api.py, api_feedback.py): refusals, bearer keys, bodies.

Owns ``Refusal`` (an answer other than 200, raised before work is done or returned per item),
``has_bearer`` (a constant-time ``Authorization: Bearer`` check), ``read_json`` (the body, bounded
in bytes, parsed) and ``refused`` (a ``Refusal`` or a field error as a response). Imports FastAPI
and the package's schema errors only; never sglang.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from alchemist_sgl.api_schemas import FieldError


class Refusal(Exception):
    """An answer other than 200 (401, 404, 409, 410, 413, 429, or 422 without a field)."""

    def __init__(self, status_code: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(content.get("error"))
        self.status_code, self.content, self.headers = status_code, content, headers

    @classmethod
    def of_field(cls, exc: FieldError) -> Refusal:
        return cls(422, exc.body())

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status_code, content=self.content, headers=self.headers)


def refused(exc: Refusal | FieldError) -> JSONResponse:
    return (Refusal.of_field(exc) if isinstance(exc, FieldError) else exc).response()


def has_bearer(header: str | None, key: str) -> bool:
    """Constant-time check of ``Authorization: Bearer <key>``."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The raw body; 413 beyond ``max_body_bytes``, checked on the declared Content-Length first,
    then while reading, so a chunked upload is cut off too."""
    too_large = Refusal(413, {"error": f"body is larger than {max_body_bytes} bytes"})
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    chunks: list[bytes] = []
    size_bytes = 0
    async for chunk in request.stream():
        size_bytes += len(chunk)
        if size_bytes > max_body_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The parsed body; a ``FieldError`` on ``body`` (422) if it is not JSON or nested too deeply."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FieldError("body", f"is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise FieldError("body", "is nested too deeply") from exc


async def read_json(request: Request, max_body_bytes: int) -> Any:
    """``read_body`` then ``parse_json``."""
    return parse_json(await read_body(request, max_body_bytes))
