"""The feedback API on live tiny servers: every answer of POST /v1/feedback, feedback that trains
the served model exactly once (kill -9 included), opt-outs, and the KTO export.

The session server covers the answers that need no special configuration; one dedicated server
covers the API key (401), the rate limit (429) and kill -9 restarts; expiry (410) is checked on
the gate test's dedicated server (test_online_lifecycle.py), which runs with a short TTL.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid

from tests.support.online import chat, post, post_status, status, wait_for
from tests.support.servers import REPO, RunningServer, dedicated_server


def _get(server: RunningServer, path: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"{server.base_url}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _rows(server: RunningServer, completion_id: str) -> list[dict]:
    code, text = _get(server, f"/v1/feedback/{completion_id}")
    assert code == 200, text
    return json.loads(text)["feedback"]


def _trained(server: RunningServer, completion_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = [r for r in _rows(server, completion_id) if r["state"] == "trained"]
        if rows:
            return rows[0]
        time.sleep(0.3)
    raise AssertionError(f"feedback on {completion_id} was not trained: {_rows(server, completion_id)}"
                         f"\n{server.log_tail()}")


def _drained(server: RunningServer) -> None:
    """Waits until no training, publish or disk write is left behind for the tests that follow (a
    publish changes the radix namespace under them)."""
    wait_for(server, lambda s: s["train"]["state"] == "idle" and s["train"]["writes_pending"] == 0
             and s["train"]["samples_pending"] == 0, what="training drained")


def _settled(server: RunningServer, published_after: int = 0, headers: dict | None = None,
             timeout_s: float = 120) -> dict:
    """The status once the loop can train nothing more of what it was given: idle, past a publish
    (more than ``published_after`` publishes or refusals), nothing queued, in a round or being
    written, and every sample fed at its final fate (online/accounting.py, Note [Sample fates]).
    Feedback rows still pending in the table are not seen here: call it once the rows in question
    are "trained" (``_trained``), which no later poll takes again."""
    def is_settled(s: dict) -> bool:
        t, p = s["train"], s["publish"]
        fates = t["samples_by_fate"]
        return (t["state"] == "idle" and t["samples_pending"] == 0 and t["samples_in_round"] == 0
                and t["writes_pending"] == 0 and p["publishes"] + p["rejected"] > published_after
                and t["samples_fed"] == fates["trained"] + fates["deferred"] + fates["dropped"] + fates["expired"])
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        code, text = _get(server, "/alchemist/status", headers)
        assert code == 200, text
        last = json.loads(text)
        if is_settled(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"the loop did not settle: train={last.get('train')} publish={last.get('publish')}"
                         f"\n{server.log_tail()}")


def test_feedback_answers_and_training(tiny_server: RunningServer) -> None:
    reply = chat(tiny_server, "Tell me about the moon and its phases, please.")
    assert reply["choices"][0]["logprobs"] is None, "log-probs are logged, never returned unasked"
    cid = reply["id"]
    _drained(tiny_server)  # earlier tests' training is over: the counters below move only for this one
    before = status(tiny_server)
    key = uuid.uuid4().hex
    first = post(tiny_server, "/v1/feedback", {"completion_id": cid, "rating": "up", "feedback_id": key})
    assert first == {"feedback_id": key, "completion_id": cid, "status": "accepted"}
    again = post(tiny_server, "/v1/feedback", {"completion_id": cid, "rating": "up", "feedback_id": key})
    assert again == first, "a repeated feedback_id returns the first answer"
    row = _trained(tiny_server, cid)
    assert row["trained_step"] >= 1
    assert len(_rows(tiny_server, cid)) == 1, "the repeated feedback_id stored no second row"
    after = _settled(tiny_server, before["publish"]["publishes"] + before["publish"]["rejected"])
    was, now = before["train"], after["train"]
    assert now["samples_fed"] == was["samples_fed"] + 1, "fed to the trainer once"
    assert now["samples_by_fate"]["trained"] == was["samples_by_fate"]["trained"] + 1, "trained once"
    assert now["samples_trained"] == was["samples_trained"] + 1, "in exactly one step"

    code, body = post_status(tiny_server, "/v1/feedback", {"completion_id": "no-such-id", "rating": "up"})
    assert code == 404
    code, body = post_status(tiny_server, "/v1/feedback", {"completion_id": cid, "score": 3})
    assert code == 422 and body["field"] == "score"
    code, body = post_status(tiny_server, "/v1/feedback", {"completion_id": cid, "choice_index": 1,
                                                           "rating": "up"})
    assert code == 422 and body["field"] == "choice_index"
    code, body = post_status(tiny_server, "/v1/feedback", {"completion_id": cid, "rating": "up",
                                                           "colour": "red"})
    assert code == 422

    down = chat(tiny_server, "Say something rude about cats.")
    post(tiny_server, "/v1/feedback", {"completion_id": down["id"], "rating": "down"})
    fixed = chat(tiny_server, "What is two plus two?")
    post(tiny_server, "/v1/feedback", {"completion_id": fixed["id"], "rating": "down",
                                        "correction": "Two plus two is four."})
    assert _trained(tiny_server, down["id"])["label"] == "down"
    assert _trained(tiny_server, fixed["id"])["label"] == "correction"
    _drained(tiny_server)
    code, text = _get(tiny_server, "/alchemist/export/kto")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert code == 200 and {"prompt", "completion", "label"} <= set(rows[0])
    assert any(r["completion"] == "Two plus two is four." and r["label"] is True for r in rows)
    assert any(r["label"] is False for r in rows)


def test_streaming_completion_answers_409_until_done(tiny_server: RunningServer) -> None:
    body = {"model": tiny_server.model, "stream": True, "max_tokens": 48, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
    req = urllib.request.Request(f"{tiny_server.base_url}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        line = b""
        while not line.startswith(b"data: {"):
            line = resp.readline()
        cid = json.loads(line[len(b"data: "):])["id"]
        code, answer = post_status(tiny_server, "/v1/feedback", {"completion_id": cid, "rating": "up"})
        rest = resp.read()
    assert code == 409 and "retry" in answer["error"].lower(), answer
    assert b"[DONE]" in rest
    assert post(tiny_server, "/v1/feedback", {"completion_id": cid, "rating": "up"})["status"] == "accepted"
    _trained(tiny_server, cid)
    _drained(tiny_server)


def test_store_false_is_never_logged(tiny_server: RunningServer) -> None:
    recorded = status(tiny_server)["store"]["bytes_recorded_total"]
    reply = chat(tiny_server, "A private question about my bank account.", store=False)
    assert status(tiny_server)["store"]["bytes_recorded_total"] == recorded, "never recorded"
    code, _ = post_status(tiny_server, "/v1/feedback", {"completion_id": reply["id"], "rating": "up"})
    assert code == 404, "store: false means never logged, so never trained"
    code, body = post_status(tiny_server, "/v1/chat/completions", {
        "model": tiny_server.model, "rid": "mine", "messages": [{"role": "user", "content": "hi"}]})
    assert code == 422 and "rid" in json.dumps(body)


def test_api_key_rate_limit_and_kill9() -> None:
    run = REPO / "var" / "test-runs" / uuid.uuid4().hex[:12]
    overrides = ("sglang.api-key=sk-test", "feedback.rate_limit_per_minute=4",
                 f"train.checkpoint_dir={run / 'ck'}", f"feedback.db_path={run / 'fb.sqlite'}")
    auth = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}

    def call(server: RunningServer, path: str, payload: dict, headers: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{server.base_url}{path}", data=json.dumps(payload).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def completion(server: RunningServer) -> str:
        code, body = call(server, "/v1/chat/completions", {
            "model": server.model, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}, auth)
        assert code == 200, body
        return body["id"]

    with dedicated_server("configs/cpu-tiny.yaml", overrides) as server:
        # Acknowledged while training is paused, then kill -9: it survives and trains once.
        assert call(server, "/alchemist/train/pause", {}, auth)[0] == 200
        kept = completion(server)
        code, answer = call(server, "/v1/feedback", {"completion_id": kept, "rating": "up"}, auth)
        assert code == 200, answer
        os.killpg(os.getpgid(server.proc.pid), signal.SIGKILL)
        server.proc.wait(timeout=30)
    def trained_rows(server: RunningServer) -> list:
        deadline = time.monotonic() + 120
        rows: list = []
        while time.monotonic() < deadline:
            code, text = _get(server, f"/v1/feedback/{kept}", {"Authorization": "Bearer sk-test"})
            rows = json.loads(text)["feedback"]
            if rows and rows[0]["state"] == "trained":
                return rows
            time.sleep(0.5)
        raise AssertionError(f"not trained: {rows}\n{server.log_tail()}")

    with dedicated_server("configs/cpu-tiny.yaml", overrides) as again:
        rows = trained_rows(again)
        # the row is "trained", so no poll takes it again; settled, nothing else can train it
        trained = _settled(again, headers=auth)["train"]["samples_trained"]
        assert len(rows) == 1 and trained == 1, "acked before the kill: trained once"
        # Killed after training, before the next checkpoint (train.checkpoint_every_s: 300):
        # the step is lost with the weights, so the row goes back and trains once more, once.
        os.killpg(os.getpgid(again.proc.pid), signal.SIGKILL)
        again.proc.wait(timeout=30)
    with dedicated_server("configs/cpu-tiny.yaml", overrides) as third:
        rows = trained_rows(third)
        # as above: a copy of the sample restored with the queue would still be queued or in a round
        trained = _settled(third, headers=auth)["train"]["samples_trained"]
        assert len(rows) == 1 and trained == 1, rows
        cid = completion(third)
        assert call(third, "/v1/feedback", {"completion_id": cid, "rating": "up"},
                    {"Content-Type": "application/json"})[0] == 401
        # feedback.rate_limit_per_minute=4: the fifth within a minute is refused.
        codes = [call(third, "/v1/feedback", {"completion_id": completion(third), "rating": "up"}, auth)[0]
                 for _ in range(5)]
        assert codes == [200, 200, 200, 200, 429], codes


BAD_FIELDS = [
    ({"rating": "meh"}, "rating"),
    ({"score": "high"}, "score"),
    ({"score": 1.5}, "score"),
    ({"rating": "up", "score": 0.5}, "rating"),
    ({"rating": "up", "correction": ""}, "correction"),
    ({"rating": "up", "comment": 7}, "comment"),
    ({"rating": "up", "feedback_id": "x" * 500}, "feedback_id"),
    ({"rating": "up", "choice_index": -1}, "choice_index"),
    ({"rating": "up", "choice_index": "0"}, "choice_index"),
]


def test_every_feedback_field_gets_a_422_naming_it(tiny_server: RunningServer) -> None:
    cid = chat(tiny_server, "One more question about rivers.")["id"]
    for extra, field in BAD_FIELDS:
        code, body = post_status(tiny_server, "/v1/feedback", {"completion_id": cid, **extra})
        assert code == 422 and field in body.get("field", "") + body.get("error", ""), (extra, body)
    code, body = post_status(tiny_server, "/v1/feedback", {"completion_id": 12, "rating": "up"})
    assert code == 422 and body["field"] == "completion_id"
    assert _rows(tiny_server, cid) == [], "nothing is stored for a refused body"


def _raw(server: RunningServer, path: str, data: bytes) -> int:
    req = urllib.request.Request(f"{server.base_url}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _declared_huge(server: RunningServer, path: str) -> int:
    """A request declaring a 64 MiB body: refused on the header, before any of it is read (a real
    client sending that much would see the 413 and a closed connection)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(64 * 1024 * 1024))
        conn.endheaders()
        conn.send(b'{"x": "')
        return conn.getresponse().status
    finally:
        conn.close()


def test_bad_bodies_on_every_route_get_a_precise_4xx(tiny_server: RunningServer) -> None:
    routes = ["/v1/feedback", "/v1/feedback/batch", "/alchemist/train/samples", "/alchemist/rollback",
              "/alchemist/commands/debug.ping"]
    before = status(tiny_server)["train"]["samples_pending"]
    for path in routes:
        assert _raw(tiny_server, path, b"{not json") == 422, path
        assert _raw(tiny_server, path, b"[1, 2]") == 422, path
        assert _raw(tiny_server, path, b"[" * 100_000 + b"]" * 100_000) in (413, 422), path
        assert _declared_huge(tiny_server, path) == 413, path
    assert _raw(tiny_server, "/alchemist/train/samples", b'{"samples": [{"prompt": 1}]}') == 422
    assert _raw(tiny_server, "/alchemist/rollback", b'{"to": 3}') == 422
    s = status(tiny_server)
    assert s["train"]["samples_pending"] == before and "train" not in s["disabled"]
    assert chat(tiny_server, "Still serving?")["choices"], "serving goes on"


OVERSIZED_BODY = b'{"comment": "' + b"x" * (8 << 20) + b'"}'  # 8 MiB, over feedback.max_body_bytes (1 MiB)


def _oversized_with_urllib(server: RunningServer, path: str) -> tuple[int, dict]:
    """urllib asks for ``Connection: close``: a server that answers while the body is still coming and
    closes resets the connection, and urllib never reads the answer."""
    req = urllib.request.Request(f"{server.base_url}{path}", data=OVERSIZED_BODY, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_oversized_bodies_get_a_413_the_client_reads(tiny_server: RunningServer) -> None:
    import requests

    def chunked():  # no Content-Length: refused while reading
        for start in range(0, len(OVERSIZED_BODY), 1 << 20):
            yield OVERSIZED_BODY[start:start + (1 << 20)]

    json_type = {"Content-Type": "application/json"}
    for path in ("/v1/feedback", "/alchemist/train/samples"):
        for attempt in range(20):
            code, body = _oversized_with_urllib(tiny_server, path)
            assert code == 413 and "larger than" in body["error"], (path, "urllib", attempt, code, body)
            answer = requests.post(f"{tiny_server.base_url}{path}", data=OVERSIZED_BODY, headers=json_type,
                                   timeout=120)
            assert answer.status_code == 413 and "larger than" in answer.json()["error"], (path, attempt)
        answer = requests.post(f"{tiny_server.base_url}{path}", data=chunked(), headers=json_type, timeout=120)
        assert answer.status_code == 413 and "larger than" in answer.json()["error"], (path, "chunked")
    assert chat(tiny_server, "Still serving after the oversized bodies?")["choices"], "serving goes on"


def test_openai_client_thumbs_up_trains_publishes_and_shows_in_metrics(tiny_server: RunningServer,
                                                                        tmp_path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=tiny_server.model, max_tokens=6,
                                           messages=[{"role": "user", "content": "Name a river."}])
    served_by = reply.model_extra["metadata"]["weight_version"]
    before = status(tiny_server)["publish"]["publishes"]
    post(tiny_server, "/v1/feedback", {"completion_id": reply.id, "rating": "up"})
    _trained(tiny_server, reply.id)
    s = wait_for(tiny_server, lambda s: s["publish"]["publishes"] > before, what="a publish")
    again = client.chat.completions.create(model=tiny_server.model, max_tokens=6,
                                           messages=[{"role": "user", "content": "Name a river."}])
    assert again.model_extra["metadata"]["weight_version"] == s["weight_version"] != served_by
    code, text = _get(tiny_server, "/metrics")
    from prometheus_client.parser import text_string_to_metric_families

    fam = {f.name: f.samples for f in text_string_to_metric_families(text)}
    ups = [x.value for x in fam["alchemist_feedback"] if x.labels.get("label") == "up"]
    assert code == 200 and ups and ups[0] >= 1
    assert fam["alchemist_versions_published"][0].value >= before + 1
    assert any(name.startswith("sglang") for name in fam), "SGLang's own metrics are there too"

    # Last wins: a second rating replaces the first (not yet trained ones) ...
    other = chat(tiny_server, "Name a mountain.")
    with_pause = post(tiny_server, "/alchemist/train/pause", {})
    assert with_pause["paused"] is True
    try:
        post(tiny_server, "/v1/feedback", {"completion_id": other["id"], "rating": "up"})
        second = post(tiny_server, "/v1/feedback", {"completion_id": other["id"], "rating": "down"})
        assert second["status"] == "replaced"
        states = sorted(r["state"] for r in _rows(tiny_server, other["id"]))
        assert states == ["pending", "replaced"]
        # ... a body over feedback.max_body_bytes is refused whole, and nothing is stored.
        big = {"completion_id": other["id"], "rating": "up", "comment": "x" * (1024 * 1024 + 10)}
        code, _ = post_status(tiny_server, "/v1/feedback", big)
        assert code == 413 and len(_rows(tiny_server, other["id"])) == 2
        code, _ = post_status(tiny_server, "/v1/feedback", {"completion_id": [1, 2], "rating": "up"})
        assert code == 422
    finally:
        post(tiny_server, "/alchemist/train/resume", {})
    _trained(tiny_server, other["id"])
    _drained(tiny_server)

    # The KTO export loads with datasets, with TRL's column names and types.
    code, text = _get(tiny_server, "/alchemist/export/kto")
    path = tmp_path / "kto.jsonl"
    path.write_text(text)
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert set(ds.column_names) == {"prompt", "completion", "label"}
    assert ds.features["label"].dtype == "bool" and ds.features["prompt"].dtype == "string"
