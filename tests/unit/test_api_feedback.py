"""The feedback routes over the real feedback store (feedback/ratings.py, on a SQLite file in
tmp_path) and an in-memory fake of the completion log's states (no sglang).

The store is the production one, so what the routes answer about last wins, a repeated
``feedback_id`` or a listing is what the store does; ``SpyStore`` only notes what the routes hand
it and which thread each call runs in.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from alchemist_sgl.api.feedback_routes import SlidingWindowLimiter, build_feedback_router
from alchemist_sgl.feedback import FeedbackInput, FeedbackResult, FeedbackStore

KEY = "secret-key"
ADMIN = "secret-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
UP = {"completion_id": "done", "rating": "up"}
STORE_MADE_ID = re.compile(r"[0-9a-f]{32}")  # the store's uuid4().hex for a feedback without an id


class Entry(NamedTuple):
    """What the store's export reads of a logged completion."""
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]


class FakeCompletions:
    """Completion log: rid -> state of each logged choice (``"expired"`` alone for a tombstone);
    a finished choice's entry has ``prompt_ids`` (1000 + n,) and ``output_ids`` (n,) for rid ``cn``."""

    def __init__(self, states: dict[str, list[str]] | None = None) -> None:
        self.states = states if states is not None else {
            "done": ["finished"], "pair": ["finished", "finished"], "live": ["running"],
            "gone": ["expired"], "half": ["finished", "running"]}
        self.threads: list[threading.Thread] = []

    def state(self, rid: str, choice_index: int = 0) -> str | None:
        self.threads.append(threading.current_thread())
        states = self.states.get(rid, [])
        return states[choice_index] if choice_index < len(states) else None

    def choices(self, rid: str) -> int:
        return len(self.states.get(rid, []))

    def get(self, rid: str, choice_index: int = 0) -> Entry | None:
        if self.state(rid, choice_index) != "finished":
            return None
        n = int(rid[1:]) if rid[1:].isdigit() else 0
        return Entry((1000 + n,), (n,))


class SpyStore(FeedbackStore):
    """The real feedback store, noting each submitted input and the thread of every call."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.inputs: list[FeedbackInput] = []
        self.threads: list[threading.Thread] = []
        self.export_args: tuple[Any, ...] | None = None

    def submit(self, fb: FeedbackInput) -> FeedbackResult:
        self.threads.append(threading.current_thread())
        self.inputs.append(fb)
        return super().submit(fb)

    def get(self, completion_id: str) -> list[dict]:
        self.threads.append(threading.current_thread())
        return super().get(completion_id)

    def delete(self, completion_id: str, choice_index: int | None = None) -> int:
        self.threads.append(threading.current_thread())
        return super().delete(completion_id, choice_index)

    def export_kto(self, completions: Any, detokenize: Callable[[list[int]], str]) -> Iterator[dict]:
        self.threads.append(threading.current_thread())  # on the first next(), as the store's own
        self.export_args = (completions, detokenize)
        yield from super().export_kto(completions, detokenize)


@pytest.fixture
def store(tmp_path: Path) -> SpyStore:
    return SpyStore(tmp_path / "feedback.sqlite")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _client(store: SpyStore, completions: FakeCompletions | None = None, *,
            host: str = "testclient", **kwargs: Any) -> TestClient:
    options: dict[str, Any] = {"api_key": None, "max_body_bytes": 1 << 20, "max_pending": 100,
                               "rate_limit_per_minute": None, "detokenize": lambda ids: f"text{ids}"}
    options.update(kwargs)
    app = FastAPI()
    app.include_router(build_feedback_router(store, completions if completions is not None else FakeCompletions(),
                                             **options))
    return TestClient(app, client=(host, 50000))


def _rows(store: SpyStore, completion_id: str) -> list[tuple[str, int, str, str]]:
    """(feedback_id, choice_index, label, state) of the stored rows, oldest first."""
    return [(r["feedback_id"], r["choice_index"], r["label"], r["state"])
            for r in reversed(FeedbackStore.get(store, completion_id))]


def test_feedback_is_submitted_off_the_event_loop_and_answered_200(store: SpyStore) -> None:
    completions = FakeCompletions()
    answer = _client(store, completions).post("/v1/feedback", json=UP)
    assert answer.status_code == 200
    feedback_id = answer.json()["feedback_id"]
    assert STORE_MADE_ID.fullmatch(feedback_id)
    assert answer.json() == {"feedback_id": feedback_id, "completion_id": "done", "status": "accepted"}
    [fb] = store.inputs
    assert (fb.completion_id, fb.choice_index, fb.rating, fb.score, fb.correction, fb.comment,
            fb.feedback_id, fb.api_key_hash) == ("done", 0, "up", None, None, None, None, None)
    assert _rows(store, "done") == [(feedback_id, 0, "up", "pending")], "committed before the 200"
    assert store.threads and completions.threads
    assert all(thread is not threading.main_thread() for thread in store.threads + completions.threads)


def test_every_field_reaches_the_store_and_last_wins(store: SpyStore) -> None:
    client = _client(store)
    body = {"completion_id": "pair", "choice_index": 1, "score": -0.5, "correction": "better",
            "comment": "", "feedback_id": "f" * 128}
    assert client.post("/v1/feedback", json=body).json()["status"] == "accepted"
    fb = store.inputs[0]
    assert (fb.choice_index, fb.rating, fb.score, fb.correction, fb.comment, fb.feedback_id) == (
        1, None, -0.5, "better", "", "f" * 128)
    assert isinstance(fb.score, float)
    again = client.post("/v1/feedback", json={"completion_id": "pair", "choice_index": 1, "rating": "down"})
    assert again.json()["status"] == "replaced"
    assert _rows(store, "pair") == [("f" * 128, 1, "correction", "replaced"),
                                    (again.json()["feedback_id"], 1, "down", "pending")], "the last wins"
    other_choice = client.post("/v1/feedback", json={"completion_id": "pair", "rating": "up"})
    assert other_choice.json()["status"] == "accepted", "last wins per choice, not per completion"
    for score in (0, 1, -1, 0.0):  # 0 is stored (not trained)
        assert client.post("/v1/feedback", json={"completion_id": "done", "score": score}).status_code == 200
    nulls = {**UP, "score": None, "comment": None, "feedback_id": None, "choice_index": None}
    assert client.post("/v1/feedback", json=nulls).status_code == 200  # null counts as absent
    assert [row[3] for row in _rows(store, "done")] == ["replaced"] * 4 + ["pending"]


def test_a_repeated_feedback_id_returns_the_first_answer(store: SpyStore) -> None:
    client = _client(store)
    first = client.post("/v1/feedback", json={**UP, "feedback_id": "once"})
    second = client.post("/v1/feedback", json={**UP, "rating": "down", "feedback_id": "once"})
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json() == {"feedback_id": "once", "completion_id": "done", "status": "accepted"}
    assert _rows(store, "done") == [("once", 0, "up", "pending")], "counted once: the replay stores nothing"


def test_a_feedback_id_the_store_refuses_answers_422_naming_it(store: SpyStore) -> None:
    store.submit(FeedbackInput("done", rating="up", feedback_id="taken", api_key_hash="someone else"))
    client = _client(store)
    answer = client.post("/v1/feedback", json={**UP, "feedback_id": "taken"})
    assert answer.status_code == 422
    assert answer.json() == {"error": "feedback_id: is already used by another API key; send a fresh one",
                             "field": "feedback_id"}
    batch = client.post("/v1/feedback/batch", json={"feedback": [UP, {**UP, "feedback_id": "taken"}]})
    assert batch.json()["results"][1] == {**answer.json(), "field": "feedback[1].feedback_id",
                                          "error": "feedback[1]." + answer.json()["error"], "status_code": 422}


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/feedback", UP), ("POST", "/v1/feedback/batch", {"feedback": [UP]}),
    ("GET", "/v1/feedback/done", None), ("DELETE", "/v1/feedback/done", None),
])
def test_the_api_key_guards_every_feedback_route(method: str, path: str, body: Any, store: SpyStore) -> None:
    client = _client(store, api_key=KEY, admin_api_key=ADMIN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}):
        answer = client.request(method, path, json=body, headers=headers)
        assert answer.status_code == 401 and "--api-key" in answer.json()["error"]
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert store.inputs == [] and store.threads == []
    assert client.request(method, path, json=body, headers=AUTH).status_code == 200
    assert client.request(method, path, json=body, headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_the_store_gets_the_keys_hash_never_the_key(store: SpyStore) -> None:
    assert _client(store, api_key=KEY).post("/v1/feedback", json=UP, headers=AUTH).status_code == 200
    [fb] = store.inputs
    assert fb.api_key_hash == hashlib.sha256(KEY.encode()).hexdigest()
    assert KEY not in repr(fb)


def test_auth_comes_before_size_and_field_checks(store: SpyStore) -> None:
    client = _client(store, api_key=KEY, max_body_bytes=10)
    assert client.post("/v1/feedback", json={"x": "y" * 100}).status_code == 401
    assert client.post("/v1/feedback", json={"x": "y" * 100}, headers=AUTH).status_code == 413
    assert _client(store, api_key=KEY).post("/v1/feedback", json={"x": 1}, headers=AUTH).status_code == 422


@pytest.mark.parametrize("body, status, words", [
    ({"completion_id": "nope", "rating": "up"}, 404, "unknown completion_id"),
    ({"completion_id": "live", "rating": "up"}, 409, "[DONE]"),
    ({"completion_id": "live", "choice_index": 3, "rating": "up"}, 409, "retry once the response has finished"),
    ({"completion_id": "half", "choice_index": 1, "rating": "up"}, 409, "still streaming"),
    ({"completion_id": "gone", "rating": "up"}, 410, "expired"),
    ({"completion_id": "gone", "choice_index": 1, "rating": "up"}, 410, "expired"),
])
def test_completion_state_answers(body: dict[str, Any], status: int, words: str, store: SpyStore) -> None:
    answer = _client(store).post("/v1/feedback", json=body)
    assert answer.status_code == status and words in answer.json()["error"]
    assert store.inputs == []


def test_bodies_over_the_limit_answer_413_by_length_and_while_reading(store: SpyStore) -> None:
    client = _client(store, max_body_bytes=1000)
    declared = client.post("/v1/feedback", json={**UP, "comment": "x" * 1000})
    assert declared.status_code == 413 and "1000 bytes" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield b" " * 300
    assert client.post("/v1/feedback", content=chunks()).status_code == 413
    assert client.post("/v1/feedback/batch", content=chunks()).status_code == 413
    assert store.inputs == []


@pytest.mark.parametrize("body, field, words", [
    ({"rating": "up"}, "completion_id", "is required"),
    ({"completion_id": "", "rating": "up"}, "completion_id", "1 to 256"),
    ({"completion_id": 7, "rating": "up"}, "completion_id", "string"),
    ({"completion_id": "x" * 257, "rating": "up"}, "completion_id", "1 to 256"),
    ({**UP, "choice_index": -1}, "choice_index", "integer >= 0"),
    ({**UP, "choice_index": "1"}, "choice_index", "integer >= 0"),
    ({**UP, "choice_index": True}, "choice_index", "integer >= 0"),
    ({**UP, "choice_index": 1.0}, "choice_index", "integer >= 0"),
    ({**UP, "choice_index": 1}, "choice_index", "has 1 logged choice"),
    ({"completion_id": "pair", "choice_index": 2, "rating": "up"}, "choice_index", "must be below 2"),
    ({"completion_id": "done"}, "rating", "one of rating"),
    ({"completion_id": "done", "rating": "meh"}, "rating", "'up' or 'down'"),
    ({"completion_id": "done", "rating": 1}, "rating", "'up' or 'down'"),
    ({**UP, "score": 0.5}, "score", "only one of"),
    ({"completion_id": "done", "score": 1.5}, "score", "[-1, 1]"),
    ({"completion_id": "done", "score": -1.01}, "score", "[-1, 1]"),
    ({"completion_id": "done", "score": True}, "score", "[-1, 1]"),
    ({"completion_id": "done", "score": "0.5"}, "score", "[-1, 1]"),
    ({"completion_id": "done", "score": 10 ** 400}, "score", "[-1, 1]"),
    ({**UP, "correction": ""}, "correction", "non-empty string"),
    ({**UP, "correction": ["a"]}, "correction", "non-empty string"),
    ({**UP, "comment": 3}, "comment", "must be a string"),
    ({**UP, "feedback_id": ""}, "feedback_id", "1 to 128"),
    ({**UP, "feedback_id": "x" * 129}, "feedback_id", "1 to 128"),
    ({**UP, "feedback_id": 12}, "feedback_id", "1 to 128"),
    ({**UP, "label": "up"}, "label", "unknown field"),
    ([UP], "body", "JSON object"),
])
def test_invalid_fields_answer_422_naming_them(body: Any, field: str, words: str, store: SpyStore) -> None:
    answer = _client(store).post("/v1/feedback", json=body)
    assert answer.status_code == 422
    assert answer.json()["field"] == field and answer.json()["error"].startswith(f"{field}: ")
    assert words in answer.json()["error"]
    assert store.inputs == []


@pytest.mark.parametrize("raw", [b"{nope", b"", b'{"completion_id": "done", "score": NaN}',
                                 b'{"completion_id": "done", "score": Infinity}', b"[" * 100_000 + b"]" * 100_000,
                                 b"\xff\xfe"])
def test_malformed_bodies_answer_422(raw: bytes, store: SpyStore) -> None:
    answer = _client(store).post("/v1/feedback", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] in ("body", "score")


def test_score_errors_have_the_documented_shape(store: SpyStore) -> None:
    answer = _client(store).post("/v1/feedback", json={"completion_id": "done", "score": 2})
    assert answer.json() == {"error": "score: must be a number in [-1, 1]", "field": "score"}


def test_a_full_pending_queue_answers_429_with_retry_after(store: SpyStore) -> None:
    store.submit(FeedbackInput("pair", rating="up"))
    store.submit(FeedbackInput("pair", choice_index=1, rating="up"))
    submitted = len(store.inputs)
    client = _client(store, max_pending=2)
    answer = client.post("/v1/feedback", json=UP)
    assert answer.status_code == 429 and "pending queue full" in answer.json()["error"]
    assert int(answer.headers["Retry-After"]) >= 1
    store.delete("pair", 1)  # one pending left: room for one more, not two
    assert client.post("/v1/feedback/batch", json={"feedback": [UP, UP]}).status_code == 429
    assert len(store.inputs) == submitted
    assert client.post("/v1/feedback", json=UP).status_code == 200


def test_the_rate_limit_answers_429_with_retry_after_on_the_injected_clock(store: SpyStore) -> None:
    clock = FakeClock()
    client = _client(store, rate_limit_per_minute=2, clock=clock)
    assert client.post("/v1/feedback", json={"completion_id": "done"}).status_code == 422  # does not count
    assert [client.post("/v1/feedback", json=UP).status_code for _ in range(2)] == [200, 200]
    refused = client.post("/v1/feedback", json=UP)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
    assert "rate limit" in refused.json()["error"]
    clock.now_s += 30.5
    assert client.post("/v1/feedback", json=UP).headers["Retry-After"] == "30"
    clock.now_s += 29.5  # 60 s after the first two: the window has moved on
    assert client.post("/v1/feedback", json=UP).status_code == 200
    assert len(store.inputs) == 3


def test_the_rate_limit_keys_by_host_without_a_key_and_by_key_hash_with_one(tmp_path: Path) -> None:
    clock = FakeClock()
    for api_key, headers, is_shared in ((None, {}, False), (KEY, AUTH, True)):
        store, completions = SpyStore(tmp_path / f"{api_key}.sqlite"), FakeCompletions()
        app = FastAPI()
        app.include_router(build_feedback_router(store, completions, api_key=api_key, max_body_bytes=1000,
                                                 max_pending=100, rate_limit_per_minute=1, detokenize=None,
                                                 clock=clock))
        first, second = TestClient(app, client=("10.0.0.1", 1)), TestClient(app, client=("10.0.0.2", 1))
        assert first.post("/v1/feedback", json=UP, headers=headers).status_code == 200
        assert first.post("/v1/feedback", json=UP, headers=headers).status_code == 429
        assert second.post("/v1/feedback", json=UP, headers=headers).status_code == (429 if is_shared else 200)


def test_a_batch_counts_each_item_against_the_rate_limit(store: SpyStore) -> None:
    clock = FakeClock()
    client = _client(store, rate_limit_per_minute=3, clock=clock)
    assert client.post("/v1/feedback/batch", json={"feedback": [UP, UP]}).status_code == 200
    answer = client.post("/v1/feedback/batch", json={"feedback": [UP, UP]})
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "60"
    too_big = client.post("/v1/feedback/batch", json={"feedback": [UP] * 4})
    assert too_big.status_code == 422 and too_big.json()["field"] == "feedback"


def test_the_limiter_slides_and_forgets_idle_keys() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(3, clock)
    assert limiter.admit("a") is None and limiter.admit("a", 2) is None
    assert limiter.admit("b", 3) is None
    clock.now_s += 10
    assert limiter.admit("a") == 50
    clock.now_s += 50
    assert limiter.admit("a", 3) is None
    for i in range(1100):  # idle keys are swept once there are many
        limiter.admit(f"k{i}")
        clock.now_s += 1
    assert len(limiter._events) < 1100


def test_batch_answers_each_item_and_submits_in_a_worker_thread(store: SpyStore) -> None:
    client = _client(store)
    client.post("/v1/feedback", json={**UP, "feedback_id": "seen"})
    items = [UP, {"completion_id": "nope", "rating": "up"}, {"completion_id": "live", "rating": "down"},
             {"completion_id": "gone", "score": 0.5}, {"completion_id": "pair", "choice_index": 2, "rating": "up"},
             {"completion_id": "pair", "choice_index": 1, "rating": "down", "feedback_id": "seen"}]
    answer = client.post("/v1/feedback/batch", json={"feedback": items})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert STORE_MADE_ID.fullmatch(results[0].pop("feedback_id"))
    assert results[0] == {"completion_id": "done", "status": "replaced"}
    assert [result.get("status_code") for result in results[1:5]] == [404, 409, 410, 422]
    assert all(result["error"] for result in results[1:5])
    assert results[4]["field"] == "feedback[4].choice_index"
    assert results[5] == {"feedback_id": "seen", "completion_id": "done", "status": "accepted"}
    assert len(store.inputs) == 3
    assert [row[1:] for row in _rows(store, "done")] == [(0, "up", "replaced"), (0, "up", "pending")]
    assert _rows(store, "pair") == [], "the replayed feedback_id stored nothing on pair"
    assert all(thread is not threading.main_thread() for thread in store.threads)


@pytest.mark.parametrize("body, field", [
    ({"feedback": [UP, {"completion_id": "done", "score": 9}]}, "feedback[1].score"),
    ({"feedback": [UP, UP, {**UP, "extra": 1}]}, "feedback[2].extra"),
    ({"feedback": [UP, "up"]}, "feedback[1]"),
    ({"feedback": []}, "feedback"), ({"feedback": UP}, "feedback"), ({}, "feedback"),
    ({"feedback": [UP] * 257}, "feedback"), ({"feedback": [UP], "more": []}, "more"),
])
def test_a_bad_batch_item_refuses_the_whole_batch(body: dict[str, Any], field: str, store: SpyStore) -> None:
    answer = _client(store).post("/v1/feedback/batch", json=body)
    assert answer.status_code == 422 and answer.json()["field"] == field
    assert store.inputs == []


def test_get_and_delete_feedback_of_a_completion(store: SpyStore) -> None:
    client = _client(store)
    client.post("/v1/feedback", json={"completion_id": "pair", "rating": "up"})
    client.post("/v1/feedback", json={"completion_id": "pair", "choice_index": 1, "score": 0.25})
    listing = client.get("/v1/feedback/pair")
    assert listing.status_code == 200 and listing.json()["completion_id"] == "pair"
    assert [row["choice_index"] for row in listing.json()["feedback"]] == [1, 0]  # newest first
    assert [row["state"] for row in listing.json()["feedback"]] == ["pending", "pending"]
    assert client.get("/v1/feedback/done").json() == {"completion_id": "done", "feedback": []}
    assert client.get("/v1/feedback/nope").status_code == 404
    assert client.delete("/v1/feedback/pair").json() == {"completion_id": "pair", "deleted": 2}
    assert client.delete("/v1/feedback/pair").json() == {"completion_id": "pair", "deleted": 0}
    assert [row["state"] for row in client.get("/v1/feedback/pair").json()["feedback"]] == ["deleted", "deleted"]
    assert client.get("/v1/feedback/" + "x" * 257).status_code == 422
    assert all(thread is not threading.main_thread() for thread in store.threads)


def test_feedback_stored_on_an_expired_completion_is_still_listed(store: SpyStore) -> None:
    store.submit(FeedbackInput("old", rating="up", feedback_id="f1"))
    completions = FakeCompletions({"old": ["expired"]})
    assert _client(store, completions).get("/v1/feedback/old").json()["feedback"][0]["feedback_id"] == "f1"


def test_the_kto_export_streams_jsonl_from_a_worker_thread(store: SpyStore) -> None:
    completions = FakeCompletions({f"c{i}": ["finished"] for i in range(150)})

    def detokenize(ids: list[int]) -> str:
        return f"text{ids} ✓"
    client = _client(store, completions, detokenize=detokenize, max_pending=150)
    feedback = [{"completion_id": f"c{i}", "rating": "up" if i % 2 == 0 else "down"} for i in range(150)]
    assert client.post("/v1/feedback/batch", json={"feedback": feedback}).status_code == 200
    store.threads.clear()
    with client.stream("GET", "/alchemist/export/kto") as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/jsonl"
        chunks = list(answer.iter_bytes())
    rows = [json.loads(line) for line in b"".join(chunks).decode("utf-8").splitlines()]
    assert len(rows) == 150 and rows[1] == {"prompt": "text[1001] ✓", "completion": "text[1] ✓", "label": False}
    assert [row["label"] for row in rows] == [i % 2 == 0 for i in range(150)]
    assert all(set(row) == {"prompt", "completion", "label"} for row in rows)
    assert store.export_args == (completions, detokenize)
    assert store.threads and all(thread is not threading.main_thread() for thread in store.threads)


def test_the_kto_export_takes_the_admin_key_and_needs_the_tokenizer(store: SpyStore) -> None:
    admin = _client(store, api_key=KEY, admin_api_key=ADMIN)
    for headers in ({}, AUTH, {"Authorization": "Bearer wrong"}):
        answer = admin.get("/alchemist/export/kto", headers=headers)
        assert answer.status_code == 401 and "--admin-api-key" in answer.json()["error"]
    assert admin.get("/alchemist/export/kto", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    only_key = _client(store, api_key=KEY)  # as SGLang's ADMIN_OPTIONAL: the api key when no admin key is set
    assert only_key.get("/alchemist/export/kto").status_code == 401
    assert only_key.get("/alchemist/export/kto", headers=AUTH).status_code == 200
    assert _client(store).get("/alchemist/export/kto").status_code == 200
    assert _client(store, detokenize=None).get("/alchemist/export/kto").status_code == 503


def test_routes_are_marked_for_sglangs_key_middleware(store: SpyStore) -> None:
    def marker(level: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def mark(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            endpoint._auth_level = level  # what sglang's auth_level() does
            return endpoint
        return mark
    router = build_feedback_router(store, FakeCompletions(), api_key=None, max_body_bytes=1000,
                                   max_pending=10, rate_limit_per_minute=None, detokenize=None,
                                   mark_feedback_endpoint=marker("normal"),
                                   mark_admin_endpoint=marker("admin_optional"))
    levels = {(method, route.path): route.endpoint._auth_level
              for route in router.routes for method in route.methods}
    assert levels == {("POST", "/v1/feedback"): "normal", ("POST", "/v1/feedback/batch"): "normal",
                      ("GET", "/v1/feedback/{completion_id}"): "normal",
                      ("DELETE", "/v1/feedback/{completion_id}"): "normal",
                      ("GET", "/alchemist/export/kto"): "admin_optional"}
