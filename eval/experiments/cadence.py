"""cadence: what the round length trades (``train.round_s``), with and without feedback delay.

Cells ``round_s`` in {15, 60, 120} x feedback delay in {0, exponential with a 20 s mean}, on ONE
server (``debug.round_s`` changes the round length between cells; debug commands are switched on
for it), plus one ``approximate`` cell on a second server with ``train.max_version_lag: 1``
(``round_s`` 60, 20 s delay). Each cell is one block of the ``online`` experiment's replay arm
(``eval.experiments.online.OnlineRun``): a steady open-loop load of the packaged chitchat
conversations (or ``--workload prompt-heavy``) at ``RATE_RPS``, a rate the trainer keeps up with,
every completion rated ``up`` through ``POST /v1/feedback`` at once or after its drawn delay; the
cell's numbers come from the whole rounds that opened inside the block (``_online_rounds``).

Per cell (docs/results.md ``cadence``): ``lag0_share_samples`` (trained samples at lag 0 / trained
samples), ``lag0_share_tokens`` (prompt tokens replayed at lag 0 / prompt tokens trained),
``lag_le1_share`` (samples at lag 0 or 1 / trained), ``reuse_by_lag``,
``feedback_to_publish_s_p50`` (client side: from each accepted feedback POST to the first publish
seen after it, by the 1 s status poll; right when the trainer keeps up, as here),
``radix_hit_rate``, ``ttft_p50_ms``, ``ttft_p95_ms``, ``samples_per_s`` (trained samples per second
of the cell's rounds), plus ``publishes`` and ``rounds``. ``approximate`` holds
``{max_version_lag, round_s, feedback_delay, lag0_share_samples, lag_le1_share}``. ``--quick``
shortens each cell (about 25 minutes in all on 2 cores, both servers' start-up included).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from eval.experiments import _online_rounds as rr
from eval.experiments.online import OnlineRun
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.runner import LoadSpec
from eval.loadgen.stats import percentile

NAME = "cadence"
ROUND_S = (15.0, 60.0, 120.0)
DELAYS_S = (0.0, 20.0)
RATE_RPS = 0.3
ROUNDS_PER_CELL = {True: 2.5, False: 4.0}   # quick / full: the block lasts this many round lengths ...
MIN_CELL_S = {True: 150.0, False: 240.0}    # ... and at least this long


def log(text: str) -> None:
    print(f"cadence {text}", flush=True)


def cell_duration_s(round_s: float, quick: bool) -> float:
    return max(MIN_CELL_S[quick], ROUNDS_PER_CELL[quick] * round_s)


def publish_times(rows: list[dict[str, Any]]) -> list[float]:
    """Times (poll clock) at which the serving version was first seen to change."""
    out, last = [], None
    for row in rows:
        if last is not None and row["version"] != last:
            out.append(row["t"])
        last = row["version"]
    return out


def to_next_publish_s(accepted_at: list[float], publishes: list[float]) -> list[float]:
    """For each accepted feedback, seconds to the first publish seen after it (none: left out)."""
    out = []
    for t in accepted_at:
        later = [p for p in publishes if p >= t]
        if later:
            out.append(later[0] - t)
    return out


def cell_numbers(summary: dict[str, Any], to_publish: list[float]) -> dict[str, Any]:
    """A cell's fields from ``_online_rounds.arm_summary`` of its block and the publish delays."""
    by_lag = summary["samples_trained_by_lag"]
    trained = sum(by_lag.values())
    fates = summary["prompt_tokens_by_fate"]
    return {"lag0_share_samples": summary["lag0_share_samples"],
            "lag0_share_tokens": rr.share(float(fates.get("lag0", 0)), float(sum(fates.values()))),
            "lag_le1_share": rr.share(float(by_lag.get("0", 0) + by_lag.get("1", 0)), float(trained)),
            "reuse_by_lag": summary["reuse_by_lag"], "samples_trained_by_lag": by_lag,
            "feedback_to_publish_s_p50": percentile(to_publish, 50) if to_publish else None,
            "radix_hit_rate": summary["radix_hit_rate"], "ttft_p50_ms": summary["ttft_p50"],
            "ttft_p95_ms": summary["ttft_p95"], "samples_per_s": summary["samples_trained_per_s"],
            "rounds": summary["rounds"], "samples_trained": summary["samples_trained"]}


def run_cell(ctx: Any, url: str, round_s: float, delay_s: float, index: int) -> dict[str, Any]:
    _command(url, "debug.round_s", {"round_s": round_s})
    duration = cell_duration_s(round_s, ctx.quick)
    run = OnlineRun(ctx, url, {"feedback_delay_s": delay_s, "poll_s": 1.0})
    run.set_arm("replay")
    rate = getattr(ctx, "rate_rps", None) or RATE_RPS
    spec = LoadSpec(ArrivalSpec(rate), int(rate * duration * 2) + 10, duration_s=duration,
                    drain_s=max(60.0, round_s + 30.0), max_turns=3, max_tokens=32,
                    seed=ctx.seed + index, label=f"replay#{index}")
    log(f"cell {index}: round_s {round_s:g}, feedback delay {delay_s:g} s, {duration:.0f} s of load")
    t0 = time.monotonic()
    run.run_block(url, ctx.workload(min_turns=2), spec)
    block = run.blocks[-1]
    rows = block.get("rows") or []
    summary = rr.arm_summary(run.blocks)
    cell = {"round_s": round_s, "feedback_delay": delay_s, "wall_s": time.monotonic() - t0,
            **cell_numbers(summary, to_next_publish_s(run.feeder.accepted_at, publish_times(rows)))}
    log(f"cell {index} done: lag0 {cell['lag0_share_samples']}, lag<=1 {cell['lag_le1_share']}, "
        f"{cell['samples_trained']:g} samples in {cell['rounds']} rounds, to publish p50 "
        f"{cell['feedback_to_publish_s_p50']}")
    return cell


def _command(url: str, kind: str, payload: dict[str, Any]) -> Any:
    r = httpx.post(f"{url}/alchemist/commands/{kind}", json=payload, timeout=30.0)
    r.raise_for_status()
    return r.json()


def run(ctx: Any) -> dict[str, Any]:
    # Each server keeps its own checkpoint folder AND feedback database (the harness gives each one
    # its own state folder, eval/server.py STATE_KEYS).
    base = ["server.enable_debug_commands=true"]
    cells = []
    with ctx.server(overrides=base) as url:
        for round_s in ROUND_S:
            for delay in DELAYS_S:
                cells.append(run_cell(ctx, url, round_s, delay, len(cells)))
    with ctx.server(overrides=[*base, "train.max_version_lag=1"]) as url:
        approx = run_cell(ctx, url, 60.0, 20.0, len(cells))
    return {"cells": cells, "rate_rps": getattr(ctx, "rate_rps", None) or RATE_RPS, "workload": getattr(ctx, "workload_name", "chitchat"),
            "approximate": {"max_version_lag": 1, "round_s": 60.0, "feedback_delay": 20.0,
                            "lag0_share_samples": approx["lag0_share_samples"],
                            "lag_le1_share": approx["lag_le1_share"], "cell": approx}}
