"""N requests behind one long system prompt store its pages once (live server, tiny model).

Stored bytes must equal (shared prefix tokens + the sum of each request's unique suffix tokens)
x bytes_per_token, up to one page per request: the page where a prompt leaves the shared prefix
holds tokens of both, so it is stored once per request.
"""

from __future__ import annotations

import json
import urllib.request

from transformers import AutoTokenizer

from tests.support.servers import REPO, dedicated_server

SYSTEM = "You are the help desk of a river museum. " + " ".join(
    f"Fact {i}: the museum's boat number {i} was built in {1900 + i} and is {i + 3} metres long."
    for i in range(1, 12))
QUESTIONS = ["When was boat 2 built?", "How long is boat 7?", "Which boat is the oldest?",
             "Is the museum open on Sundays, and what does a ticket cost?"]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _chat(base_url: str, model: str, question: str) -> None:
    body = {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200


def test_shared_system_prompt_is_stored_once() -> None:
    tokenizer = AutoTokenizer.from_pretrained(REPO / "var" / "models" / "tiny")
    prompts = [tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        tokenize=True, add_generation_prompt=True) for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    unique = sum(len(p) - shared for p in prompts)
    assert shared >= 10 * 16, "the shared prefix must span many pages"

    with dedicated_server("configs/cpu-tiny.yaml") as server:
        for question in QUESTIONS:
            _chat(server.base_url, server.model, question)
        status = _get(f"{server.base_url}/alchemist/status")

    per_token = status["record_plan"]["bytes_per_token"]
    page_bytes = 16 * per_token
    stored = status["store"]["bytes_stored"]
    expected = (shared + unique) * per_token
    without_dedup = sum(len(p) for p in prompts) * per_token
    assert status["store"]["evictions"] == 0
    assert abs(stored - expected) <= len(prompts) * page_bytes, (stored, expected, page_bytes)
    assert stored < without_dedup - (len(prompts) - 1) * shared * per_token + len(prompts) * page_bytes
    assert status["store"]["bytes_deduplicated"] > 0
