"""The /alchemist/* admin routes over a fake run_command (no scheduler, no sglang)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from alchemist_sgl.api.app import build_router
from alchemist_sgl.api.control import CommandResult

KEY = "secret-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
SAMPLE = {"prompt": "hi", "response": "hello", "rating": "up"}


class FakeCommands:
    """run_command that records each call and answers with ``answer(kind, payload)``."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], CommandResult] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.answer = answer or (lambda kind, payload: CommandResult(1, True, True, {"kind": kind}))

    async def __call__(self, kind: str, payload: dict[str, Any]) -> CommandResult:
        self.calls.append((kind, payload))
        return self.answer(kind, payload)


async def _no_status() -> dict[str, Any] | None:
    return {"weight_version": "v3"}


def _client(commands: FakeCommands, **kwargs: Any) -> TestClient:
    app = FastAPI()
    app.include_router(build_router(_no_status, commands, **kwargs))
    return TestClient(app)


def _failing(error: dict[str, Any]) -> FakeCommands:
    return FakeCommands(lambda kind, payload: CommandResult(1, True, False, error))


def test_versions_defaults_and_passes_the_result_as_is() -> None:
    listing = {"versions": [{"name": "v3"}], "serving": "v3", "total": 1}
    commands = FakeCommands(lambda kind, payload: CommandResult(1, True, True, listing))
    client = _client(commands)
    assert client.get("/alchemist/versions").json() == listing
    assert client.get("/alchemist/versions?limit=500&offset=7").status_code == 200
    assert commands.calls == [("versions.list", {"limit": 50, "offset": 0}),
                              ("versions.list", {"limit": 500, "offset": 7})]


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"), ("limit=1.5", "limit"),
    ("limit=", "limit"), ("offset=-1", "offset"), ("offset=x", "offset"),
])
def test_versions_query_is_validated(query: str, field: str) -> None:
    commands = FakeCommands()
    answer = _client(commands).get(f"/alchemist/versions?{query}")
    assert answer.status_code == 422
    assert answer.json()["field"] == field and answer.json()["error"].startswith(f"{field}: ")
    assert commands.calls == []


def test_rollback_pause_resume_and_samples_reach_their_commands() -> None:
    commands = FakeCommands()
    client = _client(commands)
    assert client.post("/alchemist/rollback", json={"to": "v12"}).json() == {"kind": "versions.rollback"}
    assert client.post("/alchemist/train/pause").status_code == 200
    assert client.post("/alchemist/train/resume").status_code == 200
    assert client.post("/alchemist/train/samples", json={"samples": [SAMPLE]}).status_code == 200
    assert [kind for kind, _ in commands.calls] == ["versions.rollback", "train.pause", "train.resume",
                                                    "train.samples"]
    assert commands.calls[0][1] == {"to": "v12"} and commands.calls[1][1] == {} == commands.calls[2][1]
    assert commands.calls[3][1] == {"samples": [{
        "prompt": "hi", "messages": None, "prompt_ids": None, "response": "hello", "response_ids": None,
        "rating": "up", "score": None, "completion_id": None}]}


@pytest.mark.parametrize("body, field", [
    ({"to": "3"}, "to"), ({"to": "v"}, "to"), ({"to": "v3a"}, "to"), ({"to": 3}, "to"),
    ({"to": "v٣"}, "to"), ({}, "to"), ({"to": "v3", "force": True}, "force"), ([1], "body"),
])
def test_rollback_body_is_validated(body: Any, field: str) -> None:
    commands = FakeCommands()
    answer = _client(commands).post("/alchemist/rollback", json=body)
    assert answer.status_code == 422 and answer.json()["field"] == field
    assert commands.calls == []


def test_samples_errors_name_the_field_path() -> None:
    commands = FakeCommands()
    bad = {"samples": [SAMPLE, SAMPLE, {**SAMPLE, "rating": None, "score": 2}]}
    answer = _client(commands).post("/alchemist/train/samples", json=bad)
    assert answer.status_code == 422
    assert answer.json() == {"error": "samples[2].score: must be a number in [-1, 1]", "field": "samples[2].score"}
    not_json = _client(commands).post("/alchemist/train/samples", content=b"{nope",
                                      headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["field"] == "body"
    assert commands.calls == []


def test_bodies_over_the_limit_answer_413_even_when_chunked() -> None:
    commands = FakeCommands()
    client = _client(commands)
    big = {"samples": [{**SAMPLE, "prompt": "x" * (1 << 20)}]}
    assert client.post("/alchemist/train/samples", json=big).status_code == 413

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield b" " * 300
    small = _client(commands, max_body_bytes=1000)
    answer = small.post("/alchemist/train/samples", content=chunks())
    assert answer.status_code == 413 and "1000 bytes" in answer.json()["error"]
    assert commands.calls == []


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/alchemist/versions", None), ("POST", "/alchemist/rollback", {"to": "v1"}),
    ("POST", "/alchemist/train/pause", None), ("POST", "/alchemist/train/resume", None),
    ("POST", "/alchemist/train/samples", {"samples": [SAMPLE]}), ("POST", "/alchemist/commands/x", {}),
])
def test_admin_key_guards_every_admin_route(method: str, path: str, body: Any) -> None:
    commands = FakeCommands()
    client = _client(commands, admin_api_key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        answer = client.request(method, path, json=body, headers=headers)
        assert answer.status_code == 401 and "error" in answer.json()
    assert commands.calls == []
    assert client.request(method, path, json=body, headers=AUTH).status_code == 200
    assert client.request(method, path, json=body, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert len(commands.calls) == 2


def test_auth_comes_before_body_checks_and_status_stays_open() -> None:
    client = _client(FakeCommands(), admin_api_key=KEY)
    assert client.post("/alchemist/train/samples", json={"samples": []}).status_code == 401
    assert client.post("/alchemist/train/samples", json={"samples": []}, headers=AUTH).status_code == 422
    assert client.get("/alchemist/status").json() == {"weight_version": "v3"}


def test_admin_endpoints_are_marked_for_sglangs_key_middleware() -> None:
    marked: list[str] = []

    def mark(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        marked.append(endpoint.__name__)
        endpoint._auth_level = "admin_optional"  # what sglang's auth_level() does
        return endpoint
    router = build_router(_no_status, FakeCommands(), mark_admin_endpoint=mark)
    levels = {route.path: getattr(route.endpoint, "_auth_level", None) for route in router.routes}
    assert levels.pop("/alchemist/status") is None
    assert set(levels.values()) == {"admin_optional"} and len(marked) == len(levels) == 7


@pytest.mark.parametrize("error, status, body", [
    ({"error": "queue full", "http_status": 429}, 429, {"error": "queue full"}),
    ({"error": "unknown version v9", "http_status": 404}, 404, {"error": "unknown version v9"}),
    ({"error": "v2 was rejected", "http_status": 409}, 409, {"error": "v2 was rejected"}),
    ({"error": "bad", "http_status": 422, "field": "samples[0].completion_id"}, 422,
     {"error": "bad", "field": "samples[0].completion_id"}),
    ({"error": "no handler", "is_unknown": True}, 404, {"error": "no handler"}),
    ({"error": "ZeroDivisionError: x"}, 422, {"error": "ZeroDivisionError: x"}),
    ({"error": "odd", "http_status": True}, 422, {"error": "odd"}),
    ({"error": "odd", "http_status": 200}, 422, {"error": "odd"}),
])
def test_command_errors_answer_their_http_status(error: dict[str, Any], status: int, body: dict[str, Any]) -> None:
    client = _client(_failing(error))
    answer = client.post("/alchemist/train/samples", json={"samples": [SAMPLE]})
    assert (answer.status_code, answer.json()) == (status, body)
    assert client.post("/alchemist/commands/any", json={}).status_code == status


def test_unanswered_command_is_504_and_generic_route_wraps_results() -> None:
    silent = _client(FakeCommands(lambda kind, payload: CommandResult(1, False, False, None)))
    assert silent.post("/alchemist/train/pause").status_code == 504
    assert silent.get("/alchemist/versions").status_code == 504
    commands = FakeCommands()
    client = _client(commands)
    assert client.post("/alchemist/commands/debug.ping", content=b"").json() == {"result": {"kind": "debug.ping"}}
    assert client.post("/alchemist/commands/debug.ping", json={"a": 1}).status_code == 200
    assert commands.calls == [("debug.ping", {}), ("debug.ping", {"a": 1})]
