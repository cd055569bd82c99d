"""HTTP pieces shared by our routers (api.py, api_feedback.py): refusals, bearer keys, bodies.

Owns ``Refusal`` (an answer other than 200, raised before work is done or returned per item),
``has_bearer`` (a constant-time ``Authorization: Bearer`` check), ``read_json`` (the body, bounded
in bytes, parsed) and ``refused`` (a ``Refusal`` or a field error as a response). Imports FastAPI
and the package's schema errors only; never sglang.

Note [refused bodies]: a 413 is sent only once the client has finished sending, up to a bound. A
server that answers and closes while the client is still sending leaves unread bytes in the
kernel's receive buffer; closing such a socket sends a TCP reset, and a client blocked in
``send`` (urllib, which asks for ``Connection: close``) gets ECONNRESET or EPIPE and never reads
the answer. So ``read_body`` reads the rest of a refused body and discards it, chunk by chunk, up
to ``REFUSED_BODY_DRAIN_BYTES`` past ``max_body_bytes``, and then answers 413 with
``Connection: close``. A body declared (Content-Length) or found to be longer than that bound is
answered at once and the connection closed: that client may see the reset, the server never reads
an unbounded body. A client that sent ``Expect: 100-continue`` has sent no body yet and is answered
at once as well.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, AsyncIterator, NoReturn

from fastapi import Request
from fastapi.responses import JSONResponse

from alchemist_sgl.api.schemas import FieldError

# How much of a refused body is read and discarded past max_body_bytes (Note [refused bodies]).
REFUSED_BODY_DRAIN_BYTES = 16 << 20  # 16 MiB


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
    then while reading, so a chunked upload is cut off too. A refused body is drained first
    (Note [refused bodies])."""
    declared = request.headers.get("content-length", "")
    stream = request.stream()
    if declared.isdigit() and int(declared) > max_body_bytes:
        await _drain(request, stream, max_body_bytes, read_bytes=0)
    chunks: list[bytes] = []
    size_bytes = 0
    async for chunk in stream:
        size_bytes += len(chunk)
        if size_bytes > max_body_bytes:
            await _drain(request, stream, max_body_bytes, read_bytes=size_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, stream: AsyncIterator[bytes], max_body_bytes: int,
                 read_bytes: int) -> NoReturn:
    """Reads and discards the rest of a body over ``max_body_bytes`` (``read_bytes`` of it already
    read), up to ``REFUSED_BODY_DRAIN_BYTES`` past the limit; then raises the 413, which closes the
    connection. Never returns."""
    bound_bytes = max_body_bytes + REFUSED_BODY_DRAIN_BYTES
    declared = request.headers.get("content-length", "")
    is_waiting = read_bytes == 0 and request.headers.get("expect", "").lower() == "100-continue"
    if not is_waiting and not (declared.isdigit() and int(declared) > bound_bytes):
        async for chunk in stream:
            read_bytes += len(chunk)
            if read_bytes > bound_bytes:
                break
    raise Refusal(413, {"error": f"body is larger than {max_body_bytes} bytes"}, headers={"Connection": "close"})


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
