"""Recordings captured by a live SGLang server equal an independent HF transformers forward.

Real SGLang on CPU (configs/cpu-tiny.yaml, fp32). The scheduler dumps each request's stitched
recording after its last prefill forward (``ALCHEMIST_SGL_RECORD_DUMP_DIR``, tests only; see
``Capture._dump``); the reference is HF transformers on the same weights with forward hooks on its
q/k/v/o/gate/up/down projections (fused the way SGLang fuses them). Covered positions must match
the reference; positions never prefilled (decoded tokens of an earlier turn) are holes. The same
server shows that a shared system prompt is stored once, and that a full pool demotes before it
evicts.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.support.online import dump_files, next_dump
from tests.support.servers import REPO, RunningServer, ServerPool, dedicated_server

CONFIG = "configs/cpu-tiny.yaml"
HOST_PAGES = 96  # the store's host pool, in pages, for the eviction test
STORY = " ".join(f"On day {i} the travellers counted {i + 7} boats near bridge {i * 3}."
                 for i in range(1, 16))
SYSTEM = "You are the help desk of a river museum. " + " ".join(
    f"Fact {i}: the museum's boat number {i} was built in {1900 + i} and is {i + 3} metres long."
    for i in range(1, 12))
QUESTIONS = ["When was boat 2 built?", "How long is boat 7?", "Which boat is the oldest?",
             "Is the museum open on Sundays, and what does a ticket cost?"]

def _env(dump: Path, **extra: str) -> dict[str, str]:
    return {"ALCHEMIST_SGL_RECORD_DUMP_DIR": str(dump), **extra}


def _overrides(*more: str) -> tuple[str, ...]:
    slot = 16 * 10240  # page_tokens x bytes_per_token of the tiny model's full plan in fp32
    return (f"store.host_bytes={HOST_PAGES * slot}", *more)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(REPO / "var/models/tiny",
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def recorder(tmp_path_factory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("record")
    dump = tmp / "dump"
    with dedicated_server(CONFIG, _overrides(), extra_env=_env(dump)) as server:
        yield server, dump


def _post(server: RunningServer, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(f"{server.base_url}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        text = resp.read()
    return json.loads(text) if text.strip().startswith(b"{") else {}


def _status(server: RunningServer) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/alchemist/status", timeout=30) as resp:
        return json.loads(resp.read())


def _chat(server: RunningServer, messages: list[dict], max_tokens: int = 8, **extra) -> dict:
    return _post(server, "/v1/chat/completions", {
        "model": server.model, "messages": messages, "max_tokens": max_tokens,
        "temperature": 0, "logprobs": True, "top_logprobs": 1, **extra})


def _chat_with_dump(server: RunningServer, dump: Path, messages: list[dict], **extra
                    ) -> tuple[dict, dict]:
    before = dump_files(dump)
    reply = _chat(server, messages, **extra)
    return reply, next_dump(dump, before, timeout_s=30)


def _reference_outputs(model, tokens: list[int]) -> dict[str, torch.Tensor]:
    """Per planned tensor [layers, tokens, width], fused as SGLang fuses (qkv, gate_up)."""
    outs: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj),
                             ("o", attn.o_proj), ("gate", mlp.gate_proj), ("up", mlp.up_proj),
                             ("down", mlp.down_proj)):
            handles.append(module.register_forward_hook(
                lambda m, a, o, key=(name, i): outs.__setitem__(key, o[0].detach())))
    try:
        with torch.no_grad():
            model(torch.tensor([tokens]))
    finally:
        for handle in handles:
            handle.remove()
    layers = range(len(model.model.layers))
    return {
        "qkv": torch.stack([torch.cat([outs["q", i], outs["k", i], outs["v", i]], -1)
                            for i in layers]),
        "o": torch.stack([outs["o", i] for i in layers]),
        "gate_up": torch.stack([torch.cat([outs["gate", i], outs["up", i]], -1) for i in layers]),
        "down": torch.stack([outs["down", i] for i in layers]),
    }


def _assert_matches_reference(model, record: dict) -> None:
    ref = _reference_outputs(model, record["tokens"])
    positions = torch.cat([torch.arange(a, b) for a, b in record["covered"]])
    assert set(record["tensors"]) == {"qkv", "o", "gate_up", "down"}
    for name, got in record["tensors"].items():
        torch.testing.assert_close(got, ref[name][:, positions], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_cold_prompt_recording_equals_reference(recorder, reference) -> None:
    server, dump = recorder
    reply, record = _chat_with_dump(server, dump, [{"role": "user", "content": STORY}])
    n = reply["usage"]["prompt_tokens"]
    assert len(record["tokens"]) == n and n > 100
    assert record["covered"] == [(0, n)]
    _assert_matches_reference(reference, record)
    status = _status(server)
    assert status["record_plan"]["tensors"] == ["qkv", "o", "gate_up", "down"]
    assert status["record_plan"]["bytes_per_token"] == 10240  # 4 layers x 640 x 4 bytes
    assert 0 < status["record_plan"]["prompt_forward_flops_avoided"] < 1
    assert {"bytes_stored", "bytes_deduplicated", "pages", "hits", "evictions", "record_ms_mean",
            "device_bytes", "host_bytes"} <= set(status["store"])
    assert status["store"]["bytes_stored"] >= n * 10240


def test_radix_hit_is_stitched_with_unaligned_tail(recorder, reference) -> None:
    server, dump = recorder
    first_msgs = [{"role": "user", "content": "Second story. " + STORY}]
    first, first_rec = _chat_with_dump(server, dump, first_msgs)
    n1 = first["usage"]["prompt_tokens"]
    assert n1 % 16 != 0, "the first prompt must end in a partial page"
    # Same prompt again: the radix cache serves whole pages, the partial tail is recomputed.
    again, again_rec = _chat_with_dump(server, dump, first_msgs)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n1 // 16 * 16
    assert again_rec["covered"] == [(0, n1)]
    _assert_matches_reference(reference, again_rec)
    # Next turn: the prefix (first prompt and maybe part of its answer) comes from the cache.
    answer = first["choices"][0]["message"]["content"]
    turn2 = first_msgs + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "And what happened on day 3?"}]
    reply, record = _chat_with_dump(server, dump, turn2)
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= n1 // 16 * 16
    n2 = reply["usage"]["prompt_tokens"]
    covered = sum(b - a for a, b in record["covered"])
    # Everything but decoded tokens that the cache held and nobody prefilled is covered,
    # including the first prompt's unaligned tail (recorded by the first request).
    assert record["covered"][0][0] == 0 and record["covered"][0][1] >= n1
    assert covered >= n2 - max(0, cached - n1)
    _assert_matches_reference(reference, record)


def test_opt_out_records_nothing(recorder) -> None:
    server, dump = recorder
    before = _status(server)["record"]["tokens_recorded"]
    _chat(server, [{"role": "user", "content": "Do not record this one, please. " + STORY}],
          custom_params={"alchemist": {"record": False}})
    assert _status(server)["record"]["tokens_recorded"] == before


def test_shared_system_prompt_is_stored_once(recorder) -> None:
    """N requests behind one long system prompt store its pages once. The stored bytes they add
    equal (shared prefix tokens + each request's unique suffix tokens) x bytes_per_token, up to one
    page per request: the page where a prompt leaves the shared prefix holds tokens of both, so it
    is stored once per request. Runs before the demotion test, while the pool has room."""
    from transformers import AutoTokenizer

    server, _ = recorder
    tokenizer = AutoTokenizer.from_pretrained(REPO / "var" / "models" / "tiny")
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True) for c in chats]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    unique = sum(len(p) - shared for p in prompts)
    assert shared >= 10 * 16, "the shared prefix must span many pages"

    before = _status(server)["store"]
    for messages, prompt in zip(chats, prompts):
        assert _chat(server, messages, max_tokens=4)["usage"]["prompt_tokens"] == len(prompt)
    status = _status(server)
    after = status["store"]
    per_token = status["record_plan"]["bytes_per_token"]
    page_bytes = 16 * per_token
    stored = after["bytes_stored"] - before["bytes_stored"]
    expected = (shared + unique) * per_token
    without_dedup = sum(len(p) for p in prompts) * per_token
    assert after["evictions"] == before["evictions"] and after["demotions"] == before["demotions"]
    assert abs(stored - expected) <= len(prompts) * page_bytes, (stored, expected, page_bytes)
    assert stored < without_dedup - (len(prompts) - 1) * shared * per_token + len(prompts) * page_bytes
    assert after["bytes_deduplicated"] > before["bytes_deduplicated"]


def test_full_store_demotes_and_serving_continues(recorder, reference) -> None:
    server, dump = recorder
    for i in range(12):  # ~12 pages each: more full pages than the pool holds
        reply, record = _chat_with_dump(
            server, dump, [{"role": "user", "content": f"Variant {i}: {STORY}"}])
    status = _status(server)
    # Pressure demotes the oldest pages to down_proj first (store/index.py, Note [Demote before
    # evict]): ten of them fit in one slot of the tiny model, so nothing needs evicting yet.
    assert status["store"]["demotions"] > 0 and status["store"]["demoted_pages"] > 0
    assert status["store"]["host_bytes"] <= status["store"]["host_capacity_bytes"]
    assert status["store"]["pages"] > HOST_PAGES
    assert "record" not in status["disabled"]
    assert record["covered"] == [(0, reply["usage"]["prompt_tokens"])]
    _assert_matches_reference(reference, record)


def test_chunked_prefill_joins_up_and_fault_disables_recording_only(
        tmp_path_factory, reference, server_pool: ServerPool) -> None:
    tmp = tmp_path_factory.mktemp("chunked")
    dump = tmp / "dump"
    env = _env(dump, ALCHEMIST_SGL_INJECT_RECORD_FAULT_AFTER="25")
    off = server_pool.get(CONFIG, ("record.enabled=false",))
    with dedicated_server(CONFIG, _overrides("sglang.chunked-prefill-size=32"),
                          extra_env=env) as server:
        msgs = [{"role": "user", "content": "Chunked. " + STORY}]
        reply, record = _chat_with_dump(server, dump, msgs)
        n = reply["usage"]["prompt_tokens"]
        assert n > 3 * 32, "the prompt must span several chunks"
        assert record["covered"] == [(0, n)]
        _assert_matches_reference(reference, record)

        # Keep sending prompts until the injected fault fires inside a recording forward.
        replies = []
        for i in range(10):
            replies.append(_chat(server, [{"role": "user", "content": f"Fault {i}. {STORY}"}]))
            if "record" in _status(server)["disabled"]:
                break
        status = _status(server)
        assert "InjectedRecordFault" in status["disabled"]["record"]
        assert status["record"]["enabled"] is False
        # Serving continues, with the same greedy outputs as a server that never records.
        after = _chat(server, msgs)
        baseline = _chat(off, msgs)
        assert after["choices"][0]["message"]["content"] == \
            baseline["choices"][0]["message"]["content"]
        assert server.is_alive()


def test_greedy_outputs_identical_with_recording_on_and_off(recorder, server_pool) -> None:
    server, _ = recorder
    off = server_pool.get(CONFIG, ("record.enabled=false",))
    assert "record_plan" not in _status(off)
    for prompt in ("Tell me about boats.", STORY, "Short one."):
        on_reply = _chat(server, [{"role": "user", "content": prompt}], max_tokens=12)
        off_reply = _chat(off, [{"role": "user", "content": prompt}], max_tokens=12)
        on_lp = on_reply["choices"][0]["logprobs"]["content"]
        off_lp = off_reply["choices"][0]["logprobs"]["content"]
        assert [c["token"] for c in on_lp] == [c["token"] for c in off_lp]
        assert [c["logprob"] for c in on_lp] == pytest.approx(
            [c["logprob"] for c in off_lp], abs=1e-5)
