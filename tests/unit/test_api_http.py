"""api/http.py: read_body's bounds at the ASGI level (a refused body is read to its end, up to a
bound, before the 413, so the client finishes sending and reads the answer: Note [refused bodies]),
and ``guard``, the one place a route's key is checked and a refusal answered (Note [route guard])."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.requests import Request

from alchemist_sgl.api.http import REFUSED_BODY_DRAIN_BYTES, BearerKey, Refusal, guard, read_body
from alchemist_sgl.api.schemas import FieldError

CHUNK_BYTES = 64 * 1024
LIMIT_BYTES = 1 << 20  # 1 MiB, feedback.max_body_bytes' default


class Upload:
    """An ASGI ``receive`` that hands out ``total_bytes`` in ``CHUNK_BYTES`` pieces and counts what
    was taken."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.sent_bytes = 0
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        size = min(CHUNK_BYTES, self.total_bytes - self.sent_bytes)
        self.sent_bytes += size
        return {"type": "http.request", "body": b"x" * size, "more_body": self.sent_bytes < self.total_bytes}


def _request(upload: Upload, *, declared_bytes: int | None, expect: str | None = None) -> Request:
    headers = [(b"content-type", b"application/json")]
    if declared_bytes is not None:
        headers.append((b"content-length", str(declared_bytes).encode()))
    if expect is not None:
        headers.append((b"expect", expect.encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/feedback", "query_string": b"", "headers": headers}
    return Request(scope, upload)


def _refusal(request: Request) -> Refusal:
    with pytest.raises(Refusal) as caught:
        asyncio.run(read_body(request, LIMIT_BYTES))
    return caught.value


@pytest.mark.parametrize("is_declared", [True, False], ids=["content-length", "chunked"])
def test_an_8_mib_body_is_read_to_its_end_then_refused_with_a_close(is_declared: bool) -> None:
    upload = Upload(8 << 20)
    refusal = _refusal(_request(upload, declared_bytes=upload.total_bytes if is_declared else None))
    assert refusal.status_code == 413 and refusal.content == {"error": f"body is larger than {LIMIT_BYTES} bytes"}
    assert refusal.headers == {"Connection": "close"}
    assert upload.sent_bytes == upload.total_bytes, "every byte the client sends is read before the answer"


def test_a_chunked_body_past_the_drain_bound_is_refused_without_reading_the_rest() -> None:
    bound_bytes = LIMIT_BYTES + REFUSED_BODY_DRAIN_BYTES
    upload = Upload(bound_bytes + 4 * CHUNK_BYTES)
    refusal = _refusal(_request(upload, declared_bytes=None))
    assert refusal.status_code == 413 and refusal.headers == {"Connection": "close"}
    assert bound_bytes < upload.sent_bytes <= bound_bytes + CHUNK_BYTES < upload.total_bytes


@pytest.mark.parametrize("declared_bytes, expect", [
    (LIMIT_BYTES + REFUSED_BODY_DRAIN_BYTES + 1, None),  # declared past the drain bound
    (8 << 20, "100-continue"),  # the client waits for a go-ahead before it sends the body
])
def test_a_body_that_will_not_be_drained_is_refused_before_any_of_it_is_read(declared_bytes: int,
                                                                              expect: str | None) -> None:
    upload = Upload(declared_bytes)
    refusal = _refusal(_request(upload, declared_bytes=declared_bytes, expect=expect))
    assert refusal.status_code == 413 and refusal.headers == {"Connection": "close"}
    assert upload.calls == 0


@pytest.mark.parametrize("is_declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_at_the_limit_is_returned_whole(is_declared: bool) -> None:
    upload = Upload(LIMIT_BYTES)
    request = _request(upload, declared_bytes=LIMIT_BYTES if is_declared else None)
    assert asyncio.run(read_body(request, LIMIT_BYTES)) == b"x" * LIMIT_BYTES


# ---- guard: the one place a route's key is checked and a refusal answered (Note [route guard]) ----

def _guarded_app(key: str | None, refusals: list[int], calls: list[str]) -> TestClient:
    from fastapi import APIRouter, FastAPI

    def mark(endpoint: Any) -> Any:
        endpoint._auth_level = "marked"  # what sglang's auth_level() does
        return endpoint
    router = APIRouter()
    route = guard(BearerKey(key, "test key", "--test-key"), mark=mark, on_refused=refusals.append)

    @router.post("/items/{name}")
    @route
    async def item(name: str, request: Request) -> JSONResponse:
        calls.append(name)
        body = await request.json()
        if body.get("refuse"):
            raise Refusal(409, {"error": "busy"}, headers={"Retry-After": "3"})
        if body.get("bad"):
            raise FieldError("bad", "is bad")
        return JSONResponse(content={"name": name})

    app = FastAPI()
    app.include_router(router)
    assert [r.endpoint._auth_level for r in router.routes] == ["marked"]
    return TestClient(app)


def test_guard_checks_the_key_before_the_endpoint_runs() -> None:
    refusals: list[int] = []
    calls: list[str] = []
    client = _guarded_app("k", refusals, calls)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        answer = client.post("/items/a", json={}, headers=headers)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert answer.json() == {"error": "missing or invalid test key: send 'Authorization: Bearer "
                                          "<the server's --test-key>'"}
    assert calls == [] and refusals == [401, 401, 401]
    answer = client.post("/items/a", json={}, headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200 and answer.json() == {"name": "a"} and calls == ["a"]
    assert _guarded_app(None, [], []).post("/items/b", json={}).status_code == 200, "no key: open"


def test_guard_answers_refusals_and_field_errors_raised_in_the_endpoint() -> None:
    refusals: list[int] = []
    client = _guarded_app(None, refusals, [])
    busy = client.post("/items/a", json={"refuse": True})
    assert busy.status_code == 409 and busy.json() == {"error": "busy"} and busy.headers["Retry-After"] == "3"
    bad = client.post("/items/a", json={"bad": True})
    assert bad.status_code == 422 and bad.json() == {"error": "bad: is bad", "field": "bad"}
    assert client.post("/items/a", json={}).status_code == 200
    assert refusals == [409, 422], "only refusals are reported"
