"""Middlewares in front of SGLang's routes: the weight-route guard and model-name version pins."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from alchemist_sgl.api.guards import REFUSED_WEIGHT_ROUTES, ModelNamePins, pin_model_names, refuse_weight_routes


def _sglang_like_app() -> tuple[FastAPI, list[dict[str, Any]]]:
    """An app with stand-ins for SGLang's routes; the OpenAI ones echo what they were given."""
    app = FastAPI()
    seen: list[dict[str, Any]] = []

    async def echo(request: Request) -> JSONResponse:
        raw = await request.body()
        seen.append({"raw": raw, "content_length": request.headers.get("content-length")})
        try:
            model = json.loads(raw).get("model")
        except ValueError:
            return JSONResponse({"error": "bad json"}, status_code=400)
        return JSONResponse({"model": model, "served": True})

    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        app.add_api_route(path, echo, methods=["POST"])
    for path in REFUSED_WEIGHT_ROUTES + ("/get_weights_by_name", "/health"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET", "POST"])
    return app, seen


def test_weight_routes_answer_403_and_others_are_untouched() -> None:
    app, _ = _sglang_like_app()
    refuse_weight_routes(app)
    client = TestClient(app)
    for path in REFUSED_WEIGHT_ROUTES:
        for method in ("GET", "POST"):
            answer = client.request(method, path, json={"model_path": "/elsewhere"})
            assert answer.status_code == 403, (method, path)
            assert answer.json()["error"].startswith(f"{path} is disabled by alchemist-sgl: ")
            assert "POST /alchemist/rollback" in answer.json()["error"]
    assert client.post("/update_weights_from_disk/", json={}).status_code == 403
    assert client.get("/get_weights_by_name").json() == {"ok": True}
    assert client.get("/health").json() == {"ok": True}
    assert client.post("/v1/completions", json={"model": "tiny"}).status_code == 200


def test_the_documented_routes_are_all_refused() -> None:
    documented = {"/update_weights_from_disk", "/update_weights_from_tensor", "/update_weights_from_distributed",
                  "/update_weights_from_ipc", "/init_weights_update_group",
                  "/init_weights_send_group_for_remote_instance", "/send_weights_to_remote_instance",
                  "/update_weight_version", "/load_lora_adapter", "/unload_lora_adapter",
                  "/load_lora_adapter_from_tensors", "/release_memory_occupation", "/resume_memory_occupation"}
    assert documented <= set(REFUSED_WEIGHT_ROUTES)
    assert len(set(REFUSED_WEIGHT_ROUTES)) == len(REFUSED_WEIGHT_ROUTES)


def _pinned_client(serving: list[str]) -> tuple[TestClient, list[dict[str, Any]]]:
    app, seen = _sglang_like_app()
    pin_model_names(app, "tiny", lambda: serving[0])
    return TestClient(app), seen


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_serving_pin_is_rewritten_to_the_served_name(path: str) -> None:
    client, seen = _pinned_client(["v3"])
    body = {"model": "tiny@v3", "messages": [{"role": "user", "content": "héllo @ you"}], "temperature": 0.1}
    answer = client.post(path, json=body)
    assert answer.status_code == 200 and answer.json() == {"model": "tiny", "served": True}
    downstream = json.loads(seen[-1]["raw"])
    assert downstream == {**body, "model": "tiny"}
    assert int(seen[-1]["content_length"]) == len(seen[-1]["raw"])


def test_other_pins_answer_404_naming_the_serving_version() -> None:
    serving = ["v3"]
    client, seen = _pinned_client(serving)
    answer = client.post("/v1/chat/completions", json={"model": "tiny@v1", "messages": []})
    assert answer.status_code == 404
    assert answer.json() == {"error": {
        "message": "model 'tiny@v1' is not served: the serving version is v3 (use 'tiny' or 'tiny@v3')",
        "type": "NotFoundError", "code": 404}}
    for pin in ("tiny@base", "tiny@", "tiny@v30", "tiny@V3"):
        assert client.post("/v1/completions", json={"model": pin, "prompt": "x"}).status_code == 404, pin
    assert seen == []
    serving[0] = "v4"  # the pin follows the serving version
    assert client.post("/v1/completions", json={"model": "tiny@v3", "prompt": "x"}).status_code == 404
    assert client.post("/v1/completions", json={"model": "tiny@v4", "prompt": "x"}).status_code == 200


def test_bodies_without_a_pin_pass_through_byte_for_byte() -> None:
    client, seen = _pinned_client(["v3"])
    raws = [b'{"model": "tiny",   "prompt": "a"}',                 # no '@' at all
            b'{"model":"tiny","prompt":"mail me@example.com"}',   # '@' elsewhere
            b'{"model": "other@v1", "prompt": "a"}',             # another model's name
            b'{"model": ["tiny@v1"], "prompt": "a"}']            # not a string
    for raw in raws:
        assert client.post("/v1/completions", content=raw,
                           headers={"Content-Type": "application/json"}).status_code == 200
    assert [entry["raw"] for entry in seen] == raws
    # other routes and methods are never looked at
    assert client.post("/generate", json={"model": "tiny@v1"}).json()["model"] == "tiny@v1"
    malformed = client.post("/v1/completions", content=b'{"model": "tiny@v1"',
                            headers={"Content-Type": "application/json"})
    assert seen[-1]["raw"] == b'{"model": "tiny@v1"' and malformed.status_code == 400  # the stand-in's own answer


def _run_asgi(app: Any, body_chunks: list[bytes], path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    """Drives an ASGI app by hand; returns what it sent. The body arrives in the given chunks."""
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": chunk, "more_body": i < len(body_chunks) - 1}
                for i, chunk in enumerate(body_chunks)]
    length = sum(len(chunk) for chunk in body_chunks)

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    return sent


@pytest.mark.parametrize("model", ["tiny@v3", "tiny"])
def test_a_streaming_response_still_streams(model: str) -> None:
    """Each chunk reaches the client before the next is produced: the handler waits for the
    middleware to have passed chunk i on before it yields chunk i + 1."""
    forwarded: list[bytes] = []

    async def streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        model_seen = json.loads(await request.body())["model"]

        async def chunks() -> Any:
            for i in range(3):
                yield f"data: {model_seen} {i}\n\n".encode()
                for _ in range(100):  # wait until the chunk was sent on
                    if len(forwarded) > i:
                        break
                    await asyncio.sleep(0)
                assert len(forwarded) > i, "the chunk was held back"
        await StreamingResponse(chunks(), media_type="text/event-stream")(scope, receive, send)

    pins = ModelNamePins(streaming_app, served_name="tiny", serving_version=lambda: "v3")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                forwarded.append(message["body"])
            await send(message)
        await pins(scope, receive, recording_send)

    body = json.dumps({"model": model, "stream": True, "messages": []}).encode()
    sent = _run_asgi(app, [body[:7], body[7:]])
    assert sent[0]["status"] == 200
    assert forwarded == [b"data: tiny 0\n\n", b"data: tiny 1\n\n", b"data: tiny 2\n\n"]


def test_after_the_body_receive_reaches_the_client() -> None:
    """The replayed body comes once; the next receive is the client's own (a disconnect here)."""
    messages: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        messages.append(await receive())
        messages.append(await receive())
        await JSONResponse({})(scope, receive, send)

    pins = ModelNamePins(app, served_name="tiny", serving_version=lambda: "v3")
    queue = [{"type": "http.request", "body": b'{"model": "tiny@v3"}', "more_body": False},
             {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "query_string": b"",
             "headers": [(b"content-length", b"20")]}
    asyncio.run(pins(scope, receive, send))
    assert messages == [{"type": "http.request", "body": b'{"model": "tiny"}', "more_body": False},
                        {"type": "http.disconnect"}]
