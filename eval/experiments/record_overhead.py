"""record-overhead: serving latency with prefill recording on vs off, per record plan.

One server per plan (``--config``, default SmolLM2 bf16 on CPU): the default plan (``record.plan``
from the config; ``auto`` resolves as in record/plan_choice.py), ``down`` (down_proj only) and
``graph`` (the four projections, the attention output and its log-sum-exp). The full run
records more than the host pool holds (SmolLM2 full plan: ~311 kB per token, 2 GiB pool), so the
store demotes old pages to ``down`` and then evicts while it is measured: ``demotions``,
``evictions``, ``spills`` and ``released_pages`` come from the store's status at the end. On each server two arms alternate in blocks (``eval.loadgen.ab.run_ab``, radix cache
flushed before every block): ``on`` records every prefill; ``off`` sends
``custom_params.alchemist.record=false``, so the same process, weights and threads serve both arms
and only the copy into the store differs (the hooks still run and return at once in ``off``: the
cost of having them installed is not in the ratio; compare against a ``record.enabled=false``
server for that). Requests go one at a time (no queueing in the latencies); multi-turn chitchat
conversations give ~100-600-token prompts.

Fields (docs/results.md): ``ttft_p50_off/on``, ``ttft_p95_off/on``, ``tpot_p50_off/on`` (ms),
``ttft_p50_ratio``, ``tpot_p50_ratio`` (on / off), ``requests_per_arm``, ``bytes_stored_off/on``
(bytes published into the store during that arm's blocks, from ``store.bytes_recorded_total``),
``radix_flushed_between_arms``, ``plan`` (tensors recorded), for the default plan at the top level
and for every plan under ``per_plan``. ``latency_samples`` feeds the report's CDF plots.
docs/results.md: a do-nothing hook varied by up to x1.047 at 30 requests per arm, so the full run
uses 120 per arm; ``--quick`` (16 per arm) only shows that the pipeline works.
With ``--url`` only that server is measured (its own plan), and ``per_plan`` says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import httpx

from eval.loadgen.ab import Arm, run_ab
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.runner import LoadSpec

NAME = "record-overhead"

QUICK = {"blocks": 2, "per_block": 8, "max_tokens": 16}
FULL = {"blocks": 6, "per_block": 20, "max_tokens": 32}
MAX_TURNS = 2
OFF = {"custom_params": {"alchemist": {"record": False}}}


def _status(url: str) -> dict[str, Any]:
    reply = httpx.get(f"{url}/alchemist/status", timeout=30.0)
    reply.raise_for_status()
    return reply.json()


def _recorded_bytes(url: str) -> int:
    return int(_status(url).get("store", {}).get("bytes_recorded_total", 0))


def _measure(ctx: Any, url: str, p: dict[str, Any]) -> dict[str, Any]:
    status = _status(url)
    if "record_plan" not in status or "record" in status.get("disabled", {}):
        raise RuntimeError(f"the server at {url} does not record (record_plan missing or recording "
                           f"disabled: {status.get('disabled')}); is capture_hooks.install wired?")
    workload = ctx.workload(min_turns=2)
    spec = LoadSpec(ArrivalSpec(math.inf), p["per_block"], max_turns=MAX_TURNS,
                    max_tokens=p["max_tokens"], max_concurrency=1, seed=ctx.seed)
    stored = {"on": 0, "off": 0}
    current = {"arm": "on"}  # set by each arm's before_block, right before its block runs

    def run_block(base_url: str, convs: Any, block_spec: LoadSpec) -> Any:
        arm = current["arm"]
        if arm == "off":
            block_spec = dataclasses.replace(block_spec, extra_body=OFF)
        before = _recorded_bytes(base_url)
        result = ctx.load(base_url, convs, block_spec)
        stored[arm] += _recorded_bytes(base_url) - before
        return result

    arms = [Arm("off", url, lambda: current.update(arm="off")),
            Arm("on", url, lambda: current.update(arm="on"))]
    ab = run_ab(arms, workload, spec, p["blocks"], run_block)
    off, on = ab.summary("off"), ab.summary("on")
    return {
        "ttft_p50_off": off["ttft_ms_p50"], "ttft_p50_on": on["ttft_ms_p50"],
        "ttft_p95_off": off["ttft_ms_p95"], "ttft_p95_on": on["ttft_ms_p95"],
        "tpot_p50_off": off["tpot_ms_p50"], "tpot_p50_on": on["tpot_ms_p50"],
        "ttft_p50_ratio": on["ttft_ms_p50"] / off["ttft_ms_p50"],
        "tpot_p50_ratio": on["tpot_ms_p50"] / off["tpot_ms_p50"],
        "requests_per_arm": min(off["completed_requests"], on["completed_requests"]),
        "failed_requests": off["failed_requests"] + on["failed_requests"],
        "bytes_stored_off": stored["off"], "bytes_stored_on": stored["on"],
        "radix_flushed_between_arms": ab.radix_flushed_between_arms,
        "plan": list(status["record_plan"]["tensors"]),
        "bytes_per_token": status["record_plan"]["bytes_per_token"],
        "record_ms_mean": _status(url)["store"].get("record_ms_mean"),
        **{k: _status(url)["store"].get(k) for k in ("demotions", "demoted_pages", "evictions",
                                                     "spills", "released_pages")},
        "latency_samples": ab.samples(),
    }


def run(ctx: Any) -> dict[str, Any]:
    p = QUICK if ctx.quick else FULL
    per_plan: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    # No feedback arrives here, so nothing trains: skip the trainer's compile at startup.
    plans = [("default", ())] if ctx.url else [("default", ("train.compile=false",)),
                                               ("down", ("train.compile=false", "record.plan=down")),
                                               ("graph", ("train.compile=false", "record.plan=graph"))]
    for label, overrides in plans:
        with ctx.server(overrides=overrides) as url:
            result = _measure(ctx, url, p)
        for arm, arm_samples in result.pop("latency_samples").items():
            samples[f"{label}/{arm}"] = arm_samples
        per_plan[label] = result
    top = dict(per_plan["default"])
    top["per_plan"] = per_plan
    top["latency_samples"] = samples
    if ctx.url:
        top["note"] = "--url: only that server's plan was measured"
    return top
