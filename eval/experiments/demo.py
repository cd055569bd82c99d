"""demo: a closed loop you can watch, in which feedback visibly moves the served model.

One live server (SmolLM2-135M-Instruct, default ``configs/cpu-smollm2-fp32.yaml``: fp32, because
a CPU without bf16 matrix units runs bf16 about 8x slower; ``--config`` picks another), started
with short rounds (``train.round_max_samples`` = the samples fed per round, ``train.round_s`` a
backstop), ``train.learning_rate`` 5e-4 with the LoRA defaults, training on, the publish gate and
the feedback guard off (every step is published). The simulated user (``_demo_rule.OpenerRule``)
wants every answer to open with "Alchemist here!", once, and then answer. Each round: chat completions for the round's
prompts (the first user turn of packaged chitchat conversations, greedy) at
the serving version; such an answer is rated ``up``, any other gets ``down`` with a ``correction``
= the phrase + the answer's first sentences without the phrase (the conversation's reference
reply's when nothing else is left). Corrections learn fastest: a
thumbs-down alone (unlikelihood) only pushes away from the answer given and names no phrase, and
thumbs-up alone needs the model to say the phrase first. Then the harness waits for the round's
publish and measures the new version.

Measures, on ``HELDOUT`` prompts never used for feedback, all through the server's HTTP API:
``measure`` = the mean log-prob per token of the phrase's tokens right after the chat-templated
prompt (SGLang's native ``/generate`` with ``input_ids`` = prompt + phrase, ``return_logprob``,
``logprob_start_len`` = prompt length - 1: the served model's input log-probs, as the integration
tests read them; the tokenizer is the server's own, from ``/model_info``); ``generation_rate`` =
the share of greedy (temperature 0) answers that open with the phrase once and go on to answer
(``opener_rate``: that open with it at all). Higher is the rewarded
direction for both.

Fields: ``phrase``, ``versions_published``, ``measure_before``, ``measure_after``,
``generation_rate_before``, ``generation_rate_after``, ``opener_rate_before`` / ``_after``, ``series`` ([[samples fed, measure], ...],
one point per round), ``rounds`` (per round: version, samples, ups, corrections, measure, the
shown answer), ``answers_before`` / ``answers_after`` ({prompt, answer} per held-out prompt),
``weight_version_before`` / ``_after``, ``moved_in_rewarded_direction`` (the measure rose and the
generation rate did not fall), ``wall_s``, ``settings``. Progress: one stderr line per round
(version, measure, one held-out answer), before/after blocks at the start and the end.
``--quick`` is the default size (about 5 to 8 minutes on 2 cores, the server's start included);
``--smoke`` is two tiny rounds, for the test suite.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from eval.experiments._demo_rule import OpenerRule, moved_up, rate

NAME = "demo"
DEFAULT_CONFIG = Path("configs/cpu-smollm2-fp32.yaml")  # used when --config is the CLI default
CLI_DEFAULT_CONFIG = Path("configs/cpu-smollm2.yaml")
SIZES = {
    "full": {"rounds": 10, "per_round": 8, "heldout": 12, "tokens": 32, "lr": 5e-4},
    "smoke": {"rounds": 2, "per_round": 2, "heldout": 2, "tokens": 8, "lr": 5e-4},
}
ROUND_S = 120.0     # the backstop: a round closes at its per_round-th sample long before this
PUBLISH_WAIT_S = 300.0
CONCURRENCY = 4
SHOW_CHARS = 90
FEED_TEMPERATURE = 0.0  # SmolLM2-135M sampled at 0.7 drifts into nonsense that corrections would teach


def log(text: str) -> None:
    print(f"demo {text}", file=sys.stderr, flush=True)


def short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SHOW_CHARS else flat[:SHOW_CHARS - 3] + "..."


class Client:
    """The HTTP calls of the demo, on one server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(timeout=300.0)
        info = self.http.get(f"{url}/model_info").json()
        self.model = info["served_model_name"]
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(info["tokenizer_path"] or info["model_path"])

    def version(self) -> str:
        return str(self.http.get(f"{self.url}/alchemist/status").json()["weight_version"])

    def chat(self, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
        r = self.http.post(f"{self.url}/v1/chat/completions", json={
            "model": self.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": temperature})
        r.raise_for_status()
        body = r.json()
        return {"id": body["id"], "text": body["choices"][0]["message"]["content"] or "",
                "version": (body.get("metadata") or {}).get("weight_version")}

    def chats(self, prompts: list[str], max_tokens: int, temperature: float) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(lambda p: self.chat(p, max_tokens, temperature), prompts))

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def phrase_logprob(self, prompt: str, phrase_ids: list[int]) -> float:
        """Mean served log-prob per token of ``phrase_ids`` right after the templated prompt."""
        ids = self.prompt_ids(prompt)
        r = self.http.post(f"{self.url}/generate", json={
            "input_ids": ids + phrase_ids, "return_logprob": True, "logprob_start_len": len(ids) - 1,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        r.raise_for_status()
        rows = r.json()["meta_info"]["input_token_logprobs"]
        # Entry i is the log-prob of input token logprob_start_len + i; the first is None.
        vals = [float(v) for v, _, _ in rows[1:1 + len(phrase_ids)]]
        if len(vals) != len(phrase_ids):
            raise RuntimeError(f"/generate returned {len(vals)} input log-probs for {len(phrase_ids)} tokens")
        return sum(vals) / len(vals)

    def feedback(self, body: dict[str, Any]) -> None:
        r = self.http.post(f"{self.url}/v1/feedback", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"/v1/feedback answered {r.status_code}: {r.text[:300]}")

    def wait_for_new_version(self, old: str) -> str:
        deadline = time.monotonic() + PUBLISH_WAIT_S
        while time.monotonic() < deadline:
            now = self.version()
            if now != old:
                return now
            time.sleep(0.5)
        raise RuntimeError(f"no version after {old} within {PUBLISH_WAIT_S:.0f} s")


def prompts_of(ctx: Any, n_heldout: int, n_feed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Held-out prompts, then (prompt, reference reply) pairs for feedback: first user turns of the
    workload, distinct texts."""
    seen: set[str] = set()
    texts: list[tuple[str, str]] = []
    for conv in ctx.workload(min_turns=1):
        text = conv.human_turns[0].strip()
        if 3 <= len(text.split()) <= 60 and text.lower() not in seen:
            seen.add(text.lower())
            texts.append((text, conv.reference_replies[0] if conv.reference_replies else ""))
        if len(texts) >= n_heldout + n_feed:
            break
    if len(texts) < n_heldout + n_feed:
        raise RuntimeError(f"the workload has {len(texts)} usable prompts, {n_heldout + n_feed} needed")
    return [t for t, _ in texts[:n_heldout]], texts[n_heldout:]


def measure(client: Client, heldout: list[str], phrase_ids: list[int]) -> float:
    return sum(client.phrase_logprob(p, phrase_ids) for p in heldout) / len(heldout)


def answers(client: Client, rule: OpenerRule, heldout: list[str], tokens: int) -> tuple[list[dict[str, str]], float | None, float]:
    """Greedy answers on the held-out prompts, the share that is ``good`` and the share that only
    opens with the phrase."""
    got = client.chats(heldout, tokens, 0.0)
    rows = [{"prompt": p, "answer": g["text"], "version": str(g["version"])} for p, g in zip(heldout, got)]
    return rows, rate(rule, [g["text"] for g in got]), sum(rule.has(g["text"]) for g in got) / len(got)


def one_round(client: Client, rule: OpenerRule, pairs: list[tuple[str, str]], tokens: int) -> dict[str, Any]:
    """Completions for ``pairs``' prompts at the serving version, their feedback (a reference reply
    fills a correction whose answer was only the phrase), and the publish after."""
    old = client.version()
    got = client.chats([q for q, _ in pairs], tokens, FEED_TEMPERATURE)
    bodies = [rule.feedback(g["id"], g["text"], ref) for g, (_, ref) in zip(got, pairs)]
    for body in bodies:
        client.feedback(body)
    new = client.wait_for_new_version(old)
    ups = sum(b["rating"] == "up" for b in bodies)
    return {"served_at": old, "version": new, "samples": len(bodies), "ups": ups,
            "corrections": sum("correction" in b for b in bodies), "stale_answers": sum(g["version"] != old for g in got)}


def run_loop(ctx: Any, url: str, p: dict[str, Any]) -> dict[str, Any]:
    rule = OpenerRule()
    client = Client(url)
    phrase_ids = list(client.tok(rule.phrase, add_special_tokens=False)["input_ids"])
    heldout, feed = prompts_of(ctx, p["heldout"], p["rounds"] * p["per_round"])
    v0 = client.version()
    m0 = measure(client, heldout, phrase_ids)
    before, rate0, open0 = answers(client, rule, heldout, p["tokens"])
    log(f"before ({v0}): phrase {rule.phrase!r} log-prob/token {m0:.3f}, greedy answers that open "
        f"with it and answer {rate0:.2f}; e.g. {heldout[0]!r} -> {short(before[0]['answer'])!r}")
    series, rounds, fed = [[0, m0]], [], 0
    for k in range(p["rounds"]):
        row = one_round(client, rule, feed[k * p["per_round"]:(k + 1) * p["per_round"]], p["tokens"])
        fed += row["samples"]
        m = measure(client, heldout, phrase_ids)
        shown = client.chat(heldout[0], p["tokens"], 0.0)["text"]
        row.update(measure=m, shown_answer=shown)
        rounds.append(row)
        series.append([fed, m])
        log(f"round {k + 1}/{p['rounds']} -> {row['version']}: {row['ups']} up, {row['corrections']} "
            f"corrections; log-prob/token {m:.3f}; {short(shown)!r}")
    v1 = client.version()
    m1 = measure(client, heldout, phrase_ids)
    after, rate1, open1 = answers(client, rule, heldout, p["tokens"])
    return {"rule": rule, "v0": v0, "v1": v1, "m0": m0, "m1": m1, "rate0": rate0, "rate1": rate1, "open0": open0, "open1": open1,
            "before": before, "after": after, "series": series, "rounds": rounds, "heldout": heldout}


def summary(r: dict[str, Any]) -> None:
    log(f"summary: {r['v0']} -> {r['v1']}; log-prob/token of {r['rule'].phrase!r}: {r['m0']:.3f} -> "
        f"{r['m1']:.3f}; greedy answers that open with it and answer: {r['rate0']:.2f} -> {r['rate1']:.2f} "
        f"(opening with it at all: {r['open0']:.2f} -> {r['open1']:.2f})")
    for b, a in zip(r["before"][:3], r["after"][:3]):
        log(f"  {short(b['prompt'])!r}\n    before: {short(b['answer'])!r}\n    after:  {short(a['answer'])!r}")


def run(ctx: Any) -> dict[str, Any]:
    p = SIZES["smoke" if getattr(ctx, "smoke", False) else "full"]
    config = DEFAULT_CONFIG if Path(ctx.config_path) == CLI_DEFAULT_CONFIG else Path(ctx.config_path)
    overrides = [f"train.round_max_samples={p['per_round']}", f"train.round_s={ROUND_S}",
                 f"train.learning_rate={p['lr']}", "train.enabled=true",
                 "publish.gate.enabled=false", "publish.guard.enabled=false"]
    t0 = time.monotonic()
    with ctx.server(config_path=config, overrides=overrides) as url:
        ready_s = time.monotonic() - t0
        log(f"server ready in {ready_s:.0f} s ({config}); {p['rounds']} rounds of {p['per_round']} "
            f"feedback, {p['heldout']} held-out prompts")
        r = run_loop(ctx, url, p)
    summary(r)
    moved = moved_up(r["m0"], r["m1"]) and r["rate1"] is not None and r["rate1"] >= r["rate0"]
    return {"phrase": r["rule"].phrase, "config": str(config), "server_ready_s": ready_s,
            "versions_published": len(r["rounds"]), "weight_version_before": r["v0"],
            "weight_version_after": r["v1"], "measure": "mean log-prob per phrase token after the prompt",
            "measure_before": r["m0"], "measure_after": r["m1"],
            "generation_rate_before": r["rate0"], "generation_rate_after": r["rate1"],
            "opener_rate_before": r["open0"], "opener_rate_after": r["open1"],
            "moved_in_rewarded_direction": moved,
            "series": r["series"], "x_label": "feedback samples", "y_label": "phrase log-prob / token",
            "rounds": r["rounds"], "answers_before": r["before"], "answers_after": r["after"],
            "wall_s": time.monotonic() - t0, "settings": {**p, "round_s": ROUND_S, "overrides": overrides}}
