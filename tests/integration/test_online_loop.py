"""The online loop on the live tiny server (fp32): exact replay in the loop, learning, rollback,
no stale KV, work units, serving stays up. One session server (``tiny_server``); every test reads
the state it starts from, so the order of tests does not matter.

The reference for exactness is independent: HF transformers + PEFT over the model folder on disk
(W0, the master copy's source) with the trainer's own (A, B), not our forward.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from alchemist_sgl.config import load_config
from alchemist_sgl.train import LoraAdapter, load_fused_weights
from tests.support.hfref import build_hf_peft, hf_grads, max_rel_err
from tests.support.online import (chat, command, post, post_status, response_logprobs, status,
                                  train_and_wait, wait_for, wait_running)
from tests.support.servers import CHUNKED_ONE_AT_A_TIME, REPO, RunningServer

TOL_FP32 = 1e-4
FOLDER = REPO / "var" / "models" / "tiny"


def _hf_reference(dump: dict) -> tuple[float, dict]:
    torch.set_num_threads(1)
    weights = load_fused_weights(FOLDER, dtype=torch.float32)
    adapter = LoraAdapter(weights.spec, rank=dump["rank"], alpha=dump["alpha"])
    adapter.load_peft_state_dict(dump["adapter"])
    model = build_hf_peft(FOLDER, torch.float32, adapter)
    sample = (torch.tensor(dump["prompt_ids"]), torch.tensor(dump["response_ids"]), 1.0)
    return hf_grads(model, [sample])


def _grads(server: RunningServer, completion_id: str, name: str) -> dict:
    out = command(server, "debug.grads", {"sample": {"completion_id": completion_id, "rating": "up"},
                                          "name": name})
    return torch.load(out["path"])


def _check_against_hf(dump: dict) -> None:
    ref_loss, ref_grads = _hf_reference(dump)
    assert abs(dump["loss"] - ref_loss) <= TOL_FP32 * abs(ref_loss), (dump["loss"], ref_loss)
    got = {k: v for k, v in dump["grads"].items() if v is not None}
    assert any("lora_A" in k and float(v.norm()) > 0 for k, v in ref_grads.items()), \
        "after publishes B != 0, so A has gradients too"
    assert max_rel_err(got, ref_grads) <= TOL_FP32


def _paused(server: RunningServer):
    class _Ctx:
        def __enter__(self):
            post(server, "/alchemist/train/pause", {})
            wait_for(server, lambda s: s["train"]["state"] == "paused", what="pause")

        def __exit__(self, *exc):
            post(server, "/alchemist/train/resume", {})
    return _Ctx()


def _ensure_publishes(server: RunningServer, n: int) -> None:
    have = status(server)["publish"]["publishes"]
    for i in range(max(0, n - have)):
        train_and_wait(server, [{"prompt": f"Warm-up sample {i}: the river is", "response": " wide and slow.",
                                 "rating": "up"}], publishes=1)


def test_replay_in_the_loop_is_exact_and_stale_is_recomputed(tiny_server: RunningServer) -> None:
    _ensure_publishes(tiny_server, 3)
    old = chat(tiny_server, "An older question about the weather in the mountains in spring?")
    train_and_wait(tiny_server, [{"prompt": "Tell me about tea.", "response": " Tea is a drink.",
                                  "rating": "up"}], publishes=1)
    fresh = chat(tiny_server, "What is a good name for a small grey cat that likes to sleep?")
    s = status(tiny_server)
    assert fresh["metadata"]["weight_version"] == s["weight_version"]
    assert old["metadata"]["weight_version"] != s["weight_version"]
    with _paused(tiny_server):
        dump = _grads(tiny_server, fresh["id"], "exact.pt")
        stale = _grads(tiny_server, old["id"], "stale.pt")
    prompt_len = len(dump["prompt_ids"])
    assert dump["replayed_tokens"] == prompt_len and dump["reuse_by_lag"] == {0: prompt_len}
    _check_against_hf(dump)
    # The older completion's recording was of a version more than train.max_version_lag (0)
    # behind: the publish released its pages (it could never replay exactly again), so the
    # trainer finds no recording and recomputes the whole prompt.
    assert stale["replayed_tokens"] == 0
    assert stale["recomputed_tokens"] == len(stale["prompt_ids"])
    assert status(tiny_server)["store"]["released_pages"] > 0
    _check_against_hf(stale)


def _learning_and_rollback(server: RunningServer, folder: Path, steps: int) -> float:
    """Trains one fixed (prompt, response) ``steps`` times; returns the gain in the served summed
    log-prob of the response, checked against run-to-run noise; then rolls back and checks the
    served log-probs are bitwise those before training."""
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    sample = {"prompt": prompt, "response": "Ultramarine blue, deep and calm.", "rating": "up"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    response_ids = tok.encode(sample["response"], add_special_tokens=False) + [tok.eos_token_id]
    before_version = status(server)["weight_version"]
    before = response_logprobs(server, prompt_ids, response_ids)
    again = response_logprobs(server, prompt_ids, response_ids)
    noise = max(abs(a - b) for a, b in zip(before, again))
    with _paused(server):
        post(server, "/alchemist/train/samples", {"samples": [sample] * steps})
    wait_for(server, lambda s: s["train"]["samples_pending"] == 0 and s["train"]["state"] == "idle"
             and s["train"]["writes_pending"] == 0, timeout_s=600, what=f"{steps} steps")
    after = response_logprobs(server, prompt_ids, response_ids)
    gain = sum(after) - sum(before)
    # Margin: 100x the run-to-run noise of the same request, and at least 0.05 nats in total.
    assert gain > max(100 * noise * len(before), 0.05), (gain, noise)
    answer = post(server, "/alchemist/rollback", {"to": before_version})
    assert answer["parent"] == before_version and answer["weight_version"] != before_version
    rolled = response_logprobs(server, prompt_ids, response_ids)
    assert rolled == before, "served log-probs after rollback equal the target's bitwise"
    return gain


def test_learning_is_visible_and_rollback_is_bitwise(tiny_server: RunningServer) -> None:
    gain = _learning_and_rollback(tiny_server, FOLDER, steps=4)
    print(f"tiny fp32: served log-prob of the trained response rose by {gain:.3f} nats over 4 steps")
    code, body = post_status(tiny_server, "/alchemist/rollback", {"to": "v999999"})
    assert code == 404 and "v999999" in body["error"]


def test_learning_is_visible_on_smollm2_bf16(server_pool) -> None:
    server = server_pool.get("configs/cpu-smollm2.yaml", (
        "train.round_max_samples=1", "train.learning_rate=0.001"))
    gain = _learning_and_rollback(server, REPO / "var" / "models" / "smollm2-135m-instruct", steps=4)
    print(f"SmolLM2 bf16: served log-prob of the trained response rose by {gain:.3f} nats over 4 steps")


def test_no_stale_kv_across_a_publish(tiny_server: RunningServer) -> None:
    question = "Describe a quiet harbour town at dawn, with boats and gulls and old stone houses."
    first = chat(tiny_server, question, max_tokens=12, logprobs=True)
    train_and_wait(tiny_server, [{"prompt": "Say hi.", "response": " Hi there!", "rating": "up"}],
                   publishes=1)
    after = chat(tiny_server, question, max_tokens=12, logprobs=True)
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, \
        "a prefix cached under the old version is never matched after a publish"
    with _paused(tiny_server):
        urllib.request.urlopen(urllib.request.Request(f"{tiny_server.base_url}/flush_cache",
                                                      method="POST"), timeout=60).read()
        flushed = chat(tiny_server, question, max_tokens=12, logprobs=True)
    assert after["choices"][0]["message"]["content"] == flushed["choices"][0]["message"]["content"]
    lp = lambda r: [c["logprob"] for c in r["choices"][0]["logprobs"]["content"]]  # noqa: E731
    assert lp(after) == lp(flushed)
    assert first["metadata"]["weight_version"] != after["metadata"]["weight_version"]


def test_work_units_yield_and_serving_stays_up(tiny_server: RunningServer) -> None:
    failures: list[str] = []
    done = threading.Event()
    served = [0]

    def client(stream: bool) -> None:
        while not done.is_set():
            body = {"model": tiny_server.model, "max_tokens": 6, "stream": stream,
                    "messages": [{"role": "user", "content": f"Count to three, request {served[0]}."}]}
            req = urllib.request.Request(f"{tiny_server.base_url}/v1/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    text = resp.read().decode()
                    if resp.status != 200 or (stream and "[DONE]" not in text):
                        failures.append(f"{resp.status}: {text[:200]}")
                served[0] += 1
            except Exception as exc:  # every failure is counted, none hidden
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(flag,)) for flag in (False, True)]
    for t in threads:
        t.start()
    try:
        start = status(tiny_server)
        for i in range(5):
            train_and_wait(tiny_server, [{"prompt": f"Item {i}: apples are", "response": " red or green.",
                                          "rating": "up"}], publishes=1)
        target = status(tiny_server)["versions"][2]["name"]
        post(tiny_server, "/alchemist/rollback", {"to": target})
        train_and_wait(tiny_server, [{"prompt": "Last: pears are", "response": " sweet.", "rating": "up"}],
                       publishes=1)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=120)
    end = status(tiny_server)
    assert failures == [] and served[0] > 0
    assert end["publish"]["publishes"] - start["publish"]["publishes"] >= 6
    layers = 4  # the tiny model
    steps = end["train"]["steps"] - start["train"]["steps"]
    units = end["train"]["units_run"] - start["train"]["units_run"]
    assert steps >= 6 and units >= steps * (2 * layers + 2), (steps, units)
    assert "units_over_budget" in end["train"]
    # Unit sizes are times: reported, never asserted (machines are shared); units_over_budget
    # counts the overruns.
    by_kind = end["train"]["max_unit_ms_by_kind"]
    print("largest unit by kind (ms):", by_kind, "units over budget:", end["train"]["units_over_budget"])
    assert set(by_kind) >= {"train", "publish.build", "publish.commit"}
    # A unit counts as over budget when it ran longer than its slice's budget, which is
    # train.slice_budget_ms (busy) or train.idle_slice_ms (idle); the largest unit (over the
    # server's life, as the counter) says which way the counter must go.
    train_cfg = load_config(REPO / "configs/cpu-tiny.yaml").train
    low, high = sorted((train_cfg.slice_budget_ms, train_cfg.idle_slice_ms))
    over, largest = end["train"]["units_over_budget"], end["train"]["max_unit_ms"]
    assert largest == pytest.approx(max(by_kind.values()))
    if over > 0:
        assert largest > low, (over, largest, low)
    if largest > high:
        assert over >= 1, (over, largest, high)


def test_sglang_weight_routes_and_old_pins_are_refused(tiny_server: RunningServer) -> None:
    code, body = post_status(tiny_server, "/update_weights_from_disk", {"model_path": "/tmp/x"})
    assert code == 403 and "rollback" in body["error"]
    _ensure_publishes(tiny_server, 1)  # v0 is then an old version, whatever ran before
    serving = status(tiny_server)["weight_version"]
    assert serving != "v0"
    code, body = post_status(tiny_server, "/v1/chat/completions", {
        "model": f"{tiny_server.model}@v0", "messages": [{"role": "user", "content": "hi"}]})
    assert code == 404 and serving in body["error"]["message"]
    ok = post(tiny_server, "/v1/chat/completions", {
        "model": f"{tiny_server.model}@{serving}", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]})
    assert ok["choices"]
    code, body = post_status(tiny_server, "/alchemist/train/samples",
                             {"samples": [{"prompt": "x", "response": "y", "score": 2}]})
    assert code == 422 and body["field"] == "samples[0].score"
    code, body = post_status(tiny_server, "/alchemist/train/samples",
                             {"samples": [{"completion_id": "nope", "rating": "up"}]})
    assert code == 422 and body["field"] == "samples[0].completion_id"


def test_trainer_reads_the_served_parameters_in_place(tiny_server: RunningServer) -> None:
    answer = command(tiny_server, "debug.storage", {})
    assert answer["is_shared"] and answer["tensors"] == 3 + 6 * 4, answer


def test_a_request_waiting_across_a_publish_runs_at_the_new_version(server_pool) -> None:
    """One running request at a time: B waits in the queue while A decodes and a step publishes.
    B is admitted (stamped) after the publish, so it runs at the new version, and its greedy tokens
    and log-probs equal the same request after a full flush."""
    server = server_pool.get("configs/cpu-tiny.yaml", CHUNKED_ONE_AT_A_TIME)
    results: dict[str, dict] = {}

    def run(name: str, content: str, tokens: int) -> None:
        results[name] = chat(server, content, max_tokens=tokens, logprobs=True)

    start = status(server)["weight_version"]
    a = threading.Thread(target=run, args=("a", "Tell a long tale about a fox and a crow.", 160))
    a.start()
    wait_running(server, 1)  # A is admitted and decoding before the step is queued
    post(server, "/alchemist/train/samples", {"samples": [
        {"prompt": "Foxes are", "response": " clever animals.", "rating": "up"}]})
    b = threading.Thread(target=run, args=("b", "Tell a long tale about a fox and a crow.", 12))
    b.start()
    a.join(timeout=300)
    b.join(timeout=300)
    after = wait_for(server, lambda s: s["train"]["state"] == "idle" and s["train"]["writes_pending"] == 0,
                     what="the step")
    assert results["b"]["metadata"]["weight_version"] == after["weight_version"] != start
    spans = results["a"]["metadata"]["weight_versions"]
    assert [sp["version"] for sp in spans] == [start, after["weight_version"]], \
        "A decoded across the publish: SGLang's spans show both versions"
    with _paused(server):
        urllib.request.urlopen(urllib.request.Request(f"{server.base_url}/flush_cache", method="POST"),
                               timeout=60).read()
        again = chat(server, "Tell a long tale about a fox and a crow.", max_tokens=12, logprobs=True)
    lp = lambda r: [c["logprob"] for c in r["choices"][0]["logprobs"]["content"]]  # noqa: E731
    assert results["b"]["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    assert lp(results["b"]) == lp(again)
