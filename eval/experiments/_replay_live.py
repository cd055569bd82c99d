"""Benchmark samples, and their recordings taken from a LIVE server through the store.

Owns ``build_chat_samples`` (prompt-heavy (prompt ids, response ids) pairs from real
conversations), ``live_recordings`` (a real ``alchemist-sgl serve`` prefills each prompt, and
each prompt + response, sent as token ids over HTTP; the ``debug.recording`` control command
reads every recording back out of the server's store into a file under its var/debug/),
``local_recordings`` (the same exports made in this process, no server), ``fill_store`` (the
exported rows written into an in-process ``ActivationStore`` through its
ordinary write path, one extend per covered range, as the scheduler writes them) and
``sample_from_store`` (what the online loop does for a queued completion: pin, take the
segments (read a layer at a time during the step) and build the trainer's ``Sample`` with the
loop's own ``build_sample``, which rebuilds a graph-plan recording's ``PromptGraph``). Imports no sglang: it talks
HTTP to the server only.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import torch

PROMPT_TOKENS, RESPONSE_TOKENS = 400, 100


def build_chat_samples(folder, conversations, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs from real conversations: the chat history (several
    conversations joined if needed) trimmed from the front to ~PROMPT_TOKENS with the template,
    then the reference reply (continued with later replies if short) cut at RESPONSE_TOKENS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)

    def template(messages: list[dict[str, str]]) -> list[int]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    rng = random.Random(seed)
    convs = [c for c in conversations if c.reference_replies]
    rng.shuffle(convs)
    pairs = [(h, r) for c in convs for h, r in zip(c.human_turns, c.reference_replies) if h and r]
    if len(pairs) < 8 * n:
        raise RuntimeError("the workload has too few (human, reply) pairs to build samples")
    samples, cursor = [], 0
    for _ in range(n):
        history: list[dict[str, str]] = []
        while True:
            human, reply = pairs[cursor]
            cursor += 1
            ids = template(history + [{"role": "user", "content": human}])
            if len(ids) >= PROMPT_TOKENS:
                break
            history += [{"role": "user", "content": human}, {"role": "assistant", "content": reply}]
        while len(ids) > PROMPT_TOKENS + 40 and len(history) >= 2:
            history = history[2:]
            trimmed = template(history + [{"role": "user", "content": human}])
            if len(trimmed) < PROMPT_TOKENS - 40:
                break
            ids = trimmed
        text, j = reply, cursor
        while len(tok(text)["input_ids"]) < RESPONSE_TOKENS:
            text += " " + pairs[j % len(pairs)][1]
            j += 1
        response = tok(text)["input_ids"][:RESPONSE_TOKENS - 1] + [tok.convert_tokens_to_ids("<|im_end|>")]
        samples.append((ids, response))
    return samples


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = client.post(url, json=body)
    if answer.status_code != 200:
        raise RuntimeError(f"POST {url} answered {answer.status_code}: {answer.text[:500]}")
    return answer.json()


def live_recordings(base_url: str, texts: Sequence[tuple[list[int], list[int]]], tag: str,
                    log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per sample ``{"prompt": export, "all": export}`` (export = the ``debug.recording`` file's
    dict: tokens, namespace, covered, segments) and the server's ``record_plan`` status.

    Each prompt is prefilled alone first (its recording, tail page included, is what a served
    request leaves in the store), then prompt + response (a radix hit over the prompt's full
    pages; the rest is recorded): the latter gives every row's outputs for the ceiling arm."""
    with httpx.Client(timeout=600.0) as client:
        status = client.get(f"{base_url}/alchemist/status").json()
        if "record_plan" not in status or "record" in status.get("disabled", {}):
            raise RuntimeError(f"the server does not record: {status.get('disabled')}")
        model = client.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        out = []
        for i, (prompt, response) in enumerate(texts):
            entry = {}
            for part, tokens in (("prompt", prompt), ("all", prompt + response)):
                _post(client, f"{base_url}/v1/completions",
                      {"model": model, "prompt": tokens, "max_tokens": 1, "temperature": 0})
                name = f"bench-replay-{tag}-{i}-{part}.pt"
                result = _post(client, f"{base_url}/alchemist/commands/debug.recording",
                               {"tokens": tokens, "name": name})["result"]
                path = Path(result["path"])
                entry[part] = torch.load(path, weights_only=True)
                path.unlink(missing_ok=True)
                if entry[part]["tokens"] != list(tokens):
                    raise RuntimeError("the exported recording names other tokens")
                log(f"{tag}: sample {i} {part}: {result['covered_tokens']}/{len(tokens)} tokens recorded")
            out.append(entry)
    return out, status["record_plan"]


def local_recordings(folder, texts: Sequence[tuple[list[int], list[int]]], dtype: torch.dtype
                     ) -> list[dict[str, Any]]:
    """Per sample ``{"prompt": export, "all": export}`` as ``live_recordings`` gives them, made in
    this process by the trainer's own no-grad forward of the base weights with ``capture`` (no
    server; ``ALCHEMIST_REPLAY_RECORDINGS=local``). Exact for the benchmark's fresh adapter
    (B = 0); not a check of the server's recording path."""
    from alchemist_sgl.train import Sample, load_fused_weights
    from alchemist_sgl.train.forward import forward_logprobs
    from alchemist_sgl.train.ops import RopeCache
    from alchemist_sgl.train.samples import plan_sample

    weights = load_fused_weights(folder, dtype=dtype)
    spec = weights.spec
    rope = RopeCache(spec.head_dim, spec.rope_theta, dtype, weights.device)
    out = []
    for prompt, response in texts:
        planned = plan_sample(Sample(prompt, response), spec, version=0, max_version_lag=0,
                              is_replay_enabled=False, dtype=dtype)
        capture: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            forward_logprobs(weights, None, rope, planned, capture=capture)
        rows = {k: torch.stack(v) for k, v in capture.items()}  # [layers, P + R, width]
        out.append({part: {"tokens": (prompt + response)[:n], "namespace": ["local", None],
                           "covered": [[0, n]],
                           "segments": [(0, n, {k: v[:, :n].contiguous() for k, v in rows.items()})]}
                    for part, n in (("prompt", len(prompt)), ("all", len(prompt) + len(response)))})
    return out


def rows_of(export: dict[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every row of a fully covered export as one tensor per name [layers, tokens, width]."""
    segments = export["segments"]
    if any(t is None for _, _, t in segments):
        raise RuntimeError(f"the recording has holes: covered {export['covered']}")
    return {n: torch.cat([t[n] for _, _, t in segments], dim=1).contiguous() for n in names}


def fill_store(exports: Sequence[dict[str, Any]], shape, tensors: Sequence[str], dtype: torch.dtype):
    """An in-process ``ActivationStore`` for the plan ``tensors`` holding the exported prompt
    recordings, written through ``open_batch``/``write``/``close_batch``; returns (store,
    namespace). Sized to hold every page with room to spare (nothing is evicted). An fp32 tensor
    of the graph plan (``lse``, exported as values) is written bit-cast into the model-dtype pool,
    as the server's capture writes it (core/plan.py, Note [Graph plan])."""
    from alchemist_sgl.core.prefix import Namespace
    from alchemist_sgl.core.plan import RecordPlan
    from alchemist_sgl.core.records import RequestExtend
    from alchemist_sgl.store import ActivationStore

    plan = RecordPlan(shape, tuple(tensors), page_tokens=16)
    pages = sum(math.ceil(len(e["tokens"]) / plan.page_tokens) for e in exports) + 4
    store = ActivationStore(plan, host_bytes=pages * plan.slot_bytes, dtype=dtype)
    namespace = Namespace(*exports[0]["namespace"])
    for i, export in enumerate(exports):
        for start, end, rows in export["segments"]:
            if rows is None:
                continue
            ext = RequestExtend(f"bench-{i}", namespace, export["tokens"], start, end - start, 0)
            batch = store.open_batch([ext])
            for name in plan.tensors:
                source = _stored_form(name, rows[name], dtype)
                for layer in range(shape.layers):
                    store.write(batch, name, layer, source[layer])
            store.close_batch(batch)
    return store, namespace


def _stored_form(name: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` as the store keeps them: the model dtype, an fp32 tensor bit-cast into it."""
    from alchemist_sgl.core.plan import FP32_TENSORS

    if name in FP32_TENSORS:
        if rows.dtype != torch.float32:
            raise ValueError(f"{name} rows must be fp32 values, got {rows.dtype}")
        return rows.contiguous().view(dtype)
    return rows.to(dtype)


def sample_from_store(store, namespace, prompt: list[int], response: list[int], version: int, trainer):
    """(trainer ``Sample``, pin), built as the online loop builds a queued sample: pin, the pinned
    pages as segments read a layer at a time by the trainer (store/readout.py, Note [Per-layer
    read-out]), then online/recorded_sample.py ``build_sample`` (the loop's own function): the
    segments labelled ``version`` and, under the graph plan with rows [0, P - 1) held at graph
    level, the ``PromptGraph`` rebuilt from the pinned rows (Note [Graph samples]). Release the
    pin with ``store.unpin`` after the step."""
    from alchemist_sgl.online.intake import PendingSample
    from alchemist_sgl.online.recorded_sample import build_sample

    pin = store.pin(prompt, namespace)
    pending = PendingSample(list(prompt), list(response), "positive", 1.0, namespace.base_version,
                            None, None, 0.0)
    try:
        return build_sample(pending, store.segments(pin, is_lazy=True), version, trainer), pin
    except BaseException:
        store.unpin(pin)
        raise
