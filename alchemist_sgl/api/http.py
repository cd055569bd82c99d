"""HTTP pieces shared by our routers (app.py, feedback_routes.py): refusals, keys, bodies.

Owns ``Refusal`` (an answer other than 200, raised before work is done or returned per item),
``BearerKey`` (a route's key, checked in constant time), ``guard`` (the decorator that states a
route's key and turns every ``Refusal`` or ``FieldError`` into its answer, Note [route guard]),
``read_body``/``read_json`` (the body, bounded in bytes, parsed) and ``refused``. Imports FastAPI
and the package's schema errors only; never sglang.

Note [route guard]: each route that takes a request wears ``@guard(key, ...)`` under FastAPI's
``@router.<method>(path)``. The key is checked before the endpoint runs, so a 401 comes before
the body is read (413) or validated (422); a ``Refusal`` or ``FieldError`` raised by the check
or anywhere in the endpoint becomes its response there, so no route repeats a ``try``. The
``mark`` (SGLang's ``auth_level``, injected by ``integration/``) goes on the wrapper, which is
the endpoint FastAPI registers and SGLang's key middleware reads; FastAPI reads the wrapped
endpoint's parameters through ``functools.wraps``.

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

import functools
import inspect
import json
import secrets
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Mapping, NoReturn, ParamSpec, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from alchemist_sgl.api.schemas import FieldError

P = ParamSpec("P")
E = TypeVar("E", bound=Callable[..., Awaitable[Response]])
# What ``guard(...)`` returns, as route-group helpers take it.
RouteGuard = Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]]


class EndpointMarker(Protocol):
    """Marks an endpoint for SGLang's key middleware and returns it (``auth_level(level)``)."""

    def __call__(self, endpoint: E, /) -> E: ...


# How much of a refused body is read and discarded past max_body_bytes (Note [refused bodies]).
REFUSED_BODY_DRAIN_BYTES = 16 << 20  # 16 MiB


class Refusal(Exception):
    """An answer other than 200 (401, 404, 409, 410, 413, 429, or 422 without a field)."""

    def __init__(self, status_code: int, content: Mapping[str, object],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content.get("error"))
        self.status_code, self.content, self.headers = status_code, dict(content), headers

    @classmethod
    def of_field(cls, exc: FieldError) -> Refusal:
        return cls(422, exc.body())

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status_code, content=self.content, headers=self.headers)


def refused(exc: Refusal | FieldError) -> JSONResponse:
    return (Refusal.of_field(exc) if isinstance(exc, FieldError) else exc).response()


@dataclass(frozen=True)
class BearerKey:
    """The key a route requires as ``Authorization: Bearer <key>``; ``key`` None: the route is
    open. ``name`` and ``flag`` word the 401 (``"API key"``, ``"--api-key"``)."""

    key: str | None
    name: str
    flag: str

    def check(self, request: Request) -> None:
        """Raises the 401 ``Refusal`` (with ``WWW-Authenticate: Bearer``) unless the request
        carries the key; a constant-time comparison."""
        if self.key and not has_bearer(request.headers.get("authorization"), self.key):
            raise Refusal(401, {"error": f"missing or invalid {self.name}: send "
                                         f"'Authorization: Bearer <the server's {self.flag}>'"},
                          headers={"WWW-Authenticate": "Bearer"})


def guard(key: BearerKey | None, *, mark: EndpointMarker | None = None,
          on_refused: Callable[[int], None] | None = None
          ) -> Callable[[Callable[P, Awaitable[Response]]], Callable[P, Awaitable[Response]]]:
    """The decorator of a route that takes ``request`` (Note [route guard]): checks ``key``
    first, then runs the endpoint; a ``Refusal`` or ``FieldError`` raised by either is answered
    as ``refused`` does, and its status passed to ``on_refused``. ``mark`` marks the wrapper."""

    def decorate(endpoint: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
        assert "request" in inspect.signature(endpoint).parameters, f"{endpoint} takes no request"

        @functools.wraps(endpoint)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> Response:
            try:
                if key is not None:
                    request = kwargs["request"]  # FastAPI passes every parameter by name
                    assert isinstance(request, Request), request
                    key.check(request)
                return await endpoint(*args, **kwargs)
            except (Refusal, FieldError) as exc:
                answer = refused(exc)
                if on_refused is not None:
                    on_refused(answer.status_code)
                return answer
        return mark(guarded) if mark is not None else guarded

    return decorate


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


def parse_json(raw: bytes) -> object:
    """The parsed body; a ``FieldError`` on ``body`` (422) if it is not JSON or nested too deeply."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FieldError("body", f"is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise FieldError("body", "is nested too deeply") from exc


async def read_json(request: Request, max_body_bytes: int) -> object:
    """``read_body`` then ``parse_json``."""
    return parse_json(await read_body(request, max_body_bytes))
