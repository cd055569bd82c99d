"""Plain serving baseline: throughput and latency percentiles at two Poisson request rates.

One server (``--config``, default SmolLM2 on CPU, or ``--url``), the packaged multi-turn chitchat
conversations (or ``--dataset-path``), open-loop arrivals at a low and a high rate, the radix cache
flushed before each rate. Fields: ``model``, ``rates_rps``, ``requests_per_rate``, ``max_tokens``,
``max_turns``, ``per_rate`` (``{"rate=R": summary}`` with ``ttft_ms_p50/p95/p99``, ``tpot_ms_*``,
``itl_ms_*``, ``e2e_ms_*``, ``request_throughput_rps``, ``output_throughput_tps``, counts),
``failed_requests``, ``latency_samples`` and ``timeline`` per rate (for the report's plots).
``--quick``: 12 requests of <= 24 new tokens per rate, a few minutes on 2 cores.
"""

from __future__ import annotations

from typing import Any

from eval.context import samples_of
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.runner import LoadSpec, get_model_name
from eval.server import flush_cache

NAME = "serving"

QUICK = {"rates_rps": (0.3, 1.5), "requests": 12, "max_tokens": 24, "duration_s": 60.0, "drain_s": 120.0}
FULL = {"rates_rps": (0.5, 2.0), "requests": 150, "max_tokens": 128, "duration_s": 900.0, "drain_s": 600.0}
SMOKE = {"rates_rps": (1.0, 3.0), "requests": 6, "max_tokens": 8, "duration_s": 20.0, "drain_s": 60.0}  # --smoke
MAX_TURNS = 3


def run(ctx: Any) -> dict[str, Any]:
    import asyncio

    p = SMOKE if ctx.smoke else QUICK if ctx.quick else FULL
    workload = ctx.workload(min_turns=2)
    per_rate: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    timeline: dict[str, Any] = {}
    flushes = 0
    with ctx.server() as url:
        model = asyncio.run(get_model_name(url))
        for i, rate in enumerate(p["rates_rps"]):
            label = f"rate={rate:g}"
            flushes += flush_cache(url)
            spec = LoadSpec(ArrivalSpec(rate), p["requests"], duration_s=p["duration_s"], drain_s=p["drain_s"],
                            max_turns=MAX_TURNS, max_tokens=p["max_tokens"], seed=ctx.seed + i, model=model,
                            conversation_offset=i * p["requests"], label=label)
            result = ctx.load(url, workload, spec)
            summary = result.summary()
            summary["offered_rate_rps"] = rate
            per_rate[label] = summary
            samples[label] = samples_of(result)
            timeline[label] = ctx.last_timeline
    return {
        "model": model,
        "rates_rps": list(p["rates_rps"]),
        "requests_per_rate": p["requests"],
        "max_tokens": p["max_tokens"],
        "max_turns": MAX_TURNS,
        "radix_flushes": flushes,
        "failed_requests": sum(s["failed_requests"] for s in per_rate.values()),
        "per_rate": per_rate,
        "latency_samples": samples,
        "timeline": timeline,
    }
