"""Greedy outputs from a radix-cache hit and from a chunked prefill equal a cold unchunked run.

Both paths write KV slots through `assign_req_to_token_pool_cpu` (the sgl_kernel CPU stand-in in
patches/cpu/sgl_kernel): a wrong slot would make attention read the wrong keys and change the
tokens and their log-probs.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.support.servers import CHUNKED_ONE_AT_A_TIME, RunningServer, ServerPool

LONG_PROMPT = (
    "You are reviewing a travel diary. " + " ".join(
        f"On day {i} the travellers walked {i * 3} kilometres along the river, counted {i + 7} boats, "
        f"and wrote down the colour of the {i}th bridge." for i in range(1, 14))
    + " Summarise the diary in one sentence.")


def _post(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        text = resp.read()
    return json.loads(text) if text.strip().startswith(b"{") else {}


def _greedy(server: RunningServer) -> tuple[list[str], list[float], int, int]:
    reply = _post(f"{server.base_url}/v1/chat/completions", {
        "model": server.model, "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 1})
    content = reply["choices"][0]["logprobs"]["content"]
    details = reply["usage"].get("prompt_tokens_details") or {}
    return ([c["token"] for c in content], [c["logprob"] for c in content],
            int(details.get("cached_tokens") or 0), int(reply["usage"]["prompt_tokens"]))


def _flush(server: RunningServer) -> None:
    _post(f"{server.base_url}/flush_cache")


def test_radix_hit_and_chunked_prefill_match_cold_run(tiny_server: RunningServer, server_pool: ServerPool) -> None:
    # Other tests train both session servers; serve W0 again on each (rollback to v0 rebuilds it
    # bitwise) so that they serve the same weights.
    chunked = server_pool.get("configs/cpu-tiny.yaml", CHUNKED_ONE_AT_A_TIME)
    for server in (tiny_server, chunked):
        _post(f"{server.base_url}/alchemist/rollback", {"to": "v0"})
        _flush(server)
    cold_tokens, cold_lp, cold_cached, prompt_tokens = _greedy(tiny_server)
    assert cold_cached == 0
    assert prompt_tokens > 200, "the prompt must span many pages and several chunks"

    hit_tokens, hit_lp, hit_cached, _ = _greedy(tiny_server)
    assert hit_cached >= prompt_tokens - 16, f"expected a radix hit, cached_tokens={hit_cached}"
    assert hit_tokens == cold_tokens
    assert hit_lp == pytest.approx(cold_lp, abs=1e-3)

    chunk_tokens, chunk_lp, chunk_cached, _ = _greedy(chunked)
    assert chunk_cached == 0
    assert chunk_tokens == cold_tokens
    assert chunk_lp == pytest.approx(cold_lp, abs=1e-3)
