"""online: training beside serving, on one server: what it trains, what it publishes, what serving pays.

One server (``--config``, default SmolLM2 bf16 on CPU; or ``--url``). Two arms alternate on it in
ABBA blocks (``eval.loadgen.ab.run_ab``; round 0 runs off, on; round 1 on, off; ...), each block an
open-loop Poisson session of multi-turn chitchat conversations (``ctx.workload()``, up to 3 turns,
32 new tokens):
  ``training_off``: ``POST /alchemist/train/pause`` is in force; no sample is fed.
  ``training_on``: ``POST /alchemist/train/resume`` at the block start, ``pause`` at its end; every
      completion served in the block is fed back at once (``POST /alchemist/train/samples``
      ``{"completion_id": id, "rating": "up"}``, 429 = back off and retry), so the server trains
      on its own fresh responses and can replay their prefill recordings.
The radix cache is flushed before every block (training paused at that moment; recordings live in
the store, not in the radix tree), so each arm starts cold and the only difference between arms is
the trainer running (and publishing: each publish is a new version, i.e. a new radix namespace).
Bounded by count (``samples`` accepted in total, ``per_block`` requests a block) and time (each
block's ``duration_s`` + ``drain_s``). A line is printed per block and per 10 samples accepted.

Fields (INTERFACES.md ``online``), deltas of ``/alchemist/status`` over the run:
  ``samples_per_s``        samples trained during the on blocks / wall time of the on blocks (at most
                           the feed rate, ~``rate_rps``: what the loop keeps up with, not its peak)
  ``prompt_coverage``      prompt tokens replayed at lag 0 / all prompt tokens trained (replayed +
                           recomputed); 1.0 = every prompt came from its recording, none recomputed.
                           ``prompt_coverage_any_lag`` counts replays at any lag (equal when
                           ``train.max_version_lag`` is 0)
  ``reuse_by_lag``         replayed prompt tokens by version lag ({"0": n, "1": n, ...})
  ``publish_ms``, ``publish_stall_ms``  medians over the ``publish.recent`` entries made in the run
                           (stall = time serving was held while the merged weights were swapped in)
  ``radix_hit_rate_training_on/off``  sum cached_tokens / sum prompt_tokens per arm: a publish
                           changes the radix namespace, so "on" loses the hits of earlier turns
  ``ttft_p50/p95_training_on/off``, ``tpot_p50_training_on/off`` (ms): what training costs serving
  ``failed_requests``, ``samples`` (accepted by the server), ``publishes`` (delta)
Also ``requests_per_arm``, ``latency_samples`` (CDF plots), ``timeline`` per block (train steps and
pending samples over time), ``per_block`` (one row per block), ``samples_trained_while_off``
(should be 0: pause works), the feeder's counts (429 retries, rejections), version and loss_ema at
start and end. Read ``ttft_*_training_on`` against ``_off`` for the serving cost, and coverage +
``reuse_by_lag`` for how much of the prompt work replay saved. ``--quick`` (~30 samples, 2 rounds)
only shows the pipeline works; the full run feeds ~200.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from eval.loadgen.ab import ABResult, Arm, run_ab
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.runner import LoadSpec
from eval.loadgen.training import (CompletionSink, PublishLog, SampleFeeder, counter_delta, coverage, get_status,
                                   lag_delta, radix_hit_rate, train_control)

NAME = "online"

QUICK = {"rounds": 2, "per_block": 15, "rate_rps": 0.5, "max_tokens": 32, "samples": 30,
         "duration_s": 90.0, "drain_s": 120.0}
FULL = {"rounds": 4, "per_block": 50, "rate_rps": 0.5, "max_tokens": 32, "samples": 200,
        "duration_s": 240.0, "drain_s": 300.0}
MAX_TURNS = 3
ARMS = ("off", "on")
LABELS = {"on": "training_on", "off": "training_off"}


def _train(status: dict[str, Any]) -> dict[str, Any]:
    return status.get("train") or {}


def check_server(status: dict[str, Any], url: str) -> None:
    train = status.get("train")
    if not isinstance(train, dict) or "samples_trained" not in train:
        raise RuntimeError(f"the server at {url} reports no train section in /alchemist/status "
                           f"(disabled: {status.get('disabled')}); is the training loop wired?")


class OnlineRun:
    """The state one run accumulates; ``run_block`` is handed to ``run_ab``."""

    def __init__(self, ctx: Any, url: str, p: dict[str, Any], post: Callable | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.ctx, self.url, self.p, self.clock = ctx, url, p, clock
        self.t_start = clock()
        self.arm = "off"
        self.on_wall_s = 0.0
        self.trained = {"on": 0.0, "off": 0.0}
        self.timeline: dict[str, Any] = {}
        self.per_block: dict[str, dict[str, Any]] = {}
        self.feeder = SampleFeeder(url, p["samples"], post=post, on_accepted=self._accepted)
        self.sink = CompletionSink(sink=self.feeder.put)
        self.start = get_status(url)
        check_server(self.start, url)
        self.publishes = PublishLog.starting_at(self.start.get("publish"))
        self._printed = 0

    def log(self, text: str) -> None:
        print(f"online [{self.clock() - self.t_start:7.1f} s] {text}", flush=True)

    def _accepted(self, total: int) -> None:
        if total // 10 > self._printed // 10 or total >= self.p["samples"] > self._printed:
            self.log(f"{total}/{self.p['samples']} samples accepted")
        self._printed = total

    def set_arm(self, arm: str) -> None:
        self.arm = arm

    def run_block(self, base_url: str, convs: Any, spec: LoadSpec) -> Any:
        arm = self.arm
        if arm == "on":
            train_control(base_url, "resume")
            t0, before = self.clock(), get_status(base_url)
            self.feeder.start()
            try:
                result = self.ctx.load(base_url, convs, spec, feedback=self.sink, poll_status=True)
            finally:
                self.feeder.stop()
                train_control(base_url, "pause")
            self.on_wall_s += self.clock() - t0
        else:
            before = get_status(base_url)
            result = self.ctx.load(base_url, convs, spec, poll_status=True)
        after = get_status(base_url)
        self.publishes.add(after.get("publish"))
        b, a = _train(before), _train(after)
        trained = counter_delta(b, a, "samples_trained")
        self.trained[arm] += trained
        self.timeline[spec.label] = list(getattr(self.ctx, "last_timeline", []) or [])
        failed = sum(1 for r in result.records if r.get("error") is not None)
        row = {"arm": LABELS[arm], "requests": len(result.records), "failed": failed,
               "samples_trained": trained, "steps": counter_delta(b, a, "steps"),
               "weight_version": after.get("weight_version"), "samples_pending": a.get("samples_pending"),
               "hit_rate": radix_hit_rate(result.records)}
        self.per_block[spec.label] = row
        self.log(f"block {len(self.per_block)} {spec.label} ({LABELS[arm]}): {row['requests']} requests "
                 f"({failed} failed), +{trained:g} samples trained, +{row['steps']:g} steps, "
                 f"{row['weight_version']}, {row['samples_pending']} pending")
        return result


def assemble(run: OnlineRun, ab: ABResult, end: dict[str, Any]) -> dict[str, Any]:
    """The result dict from a finished run (pure given its inputs)."""
    b, a = _train(run.start), _train(end)
    cov = coverage(b, a)
    on, off = ab.summary("on"), ab.summary("off")
    samples = ab.samples()
    feeder = run.feeder.summary()
    return {
        "samples_per_s": run.trained["on"] / run.on_wall_s if run.on_wall_s > 0 else float("nan"),
        "prompt_coverage": cov["lag0"],
        "reuse_by_lag": lag_delta(b.get("reuse_by_lag"), a.get("reuse_by_lag")),
        "publish_ms": run.publishes.median("publish_ms"),
        "publish_stall_ms": run.publishes.median("stall_ms"),
        "radix_hit_rate_training_on": radix_hit_rate(ab.records["on"]),
        "radix_hit_rate_training_off": radix_hit_rate(ab.records["off"]),
        "ttft_p50_training_on": on["ttft_ms_p50"], "ttft_p50_training_off": off["ttft_ms_p50"],
        "ttft_p95_training_on": on["ttft_ms_p95"], "ttft_p95_training_off": off["ttft_ms_p95"],
        "tpot_p50_training_on": on["tpot_ms_p50"], "tpot_p50_training_off": off["tpot_ms_p50"],
        "failed_requests": on["failed_requests"] + off["failed_requests"],
        "samples": feeder["accepted"],
        "publishes": int(counter_delta(run.start.get("publish") or {}, end.get("publish") or {}, "publishes")),
        "requests_per_arm": min(on["completed_requests"], off["completed_requests"]),
        "prompt_coverage_any_lag": cov["any_lag"],
        "prompt_tokens_trained": cov["prompt_tokens"],
        "samples_trained": counter_delta(b, a, "samples_trained"),
        "samples_trained_while_off": run.trained["off"],
        "train_steps": counter_delta(b, a, "steps"),
        "tokens_trained": counter_delta(b, a, "tokens_trained"),
        "stale_recomputes": counter_delta(b, a, "stale_recomputes"),
        "publishes_rejected": counter_delta(run.start.get("publish") or {}, end.get("publish") or {}, "rejected"),
        "publish_entries_seen": len(run.publishes.entries),
        "training_on_wall_s": run.on_wall_s,
        "samples_pending_end": a.get("samples_pending"),
        "weight_version_start": run.start.get("weight_version"), "weight_version_end": end.get("weight_version"),
        "loss_ema_start": b.get("loss_ema"), "loss_ema_end": a.get("loss_ema"),
        "radix_flushed_between_arms": ab.radix_flushed_between_arms,
        "block_order": list(ab.order),
        "feeder": {k: v for k, v in feeder.items() if k != "errors"},
        "feeder_errors": feeder["errors"],
        "per_block": run.per_block,
        "latency_samples": {LABELS[arm]: samples[arm] for arm in ARMS},
        "timeline": run.timeline,
    }


def measure(ctx: Any, url: str, p: dict[str, Any], post: Callable | None = None) -> dict[str, Any]:
    run = OnlineRun(ctx, url, p, post=post)
    was_paused = bool(_train(run.start).get("paused"))
    spec = LoadSpec(ArrivalSpec(p["rate_rps"]), p["per_block"], duration_s=p["duration_s"], drain_s=p["drain_s"],
                    max_turns=MAX_TURNS, max_tokens=p["max_tokens"], seed=ctx.seed)
    arms = [Arm(arm, url, (lambda a=arm: run.set_arm(a))) for arm in ARMS]
    run.log(f"{p['rounds']} rounds x {len(arms)} blocks of {p['per_block']} requests at {p['rate_rps']:g} rps, "
            f"up to {p['samples']} samples; server at {run.start.get('weight_version')}")
    train_control(url, "pause")  # nothing trains before the first on block
    try:
        ab = run_ab(arms, ctx.workload(min_turns=2), spec, p["rounds"], run.run_block)
    finally:
        if not was_paused:
            train_control(url, "resume")  # leave the server as found
    end = get_status(url)
    run.publishes.add(end.get("publish"))
    if run.feeder.accepted == 0:
        raise RuntimeError(f"no training sample was accepted by {url}: {run.feeder.summary()}")
    result = assemble(run, ab, end)
    if not result["samples_trained"]:
        result["note"] = "the server accepted samples but trained none during the run (trainer not running?)"
        run.log(f"WARNING: {result['note']}")
    run.log(f"done: {result['samples']} samples, {result['publishes']} publishes, "
            f"coverage {result['prompt_coverage']:.3f}, {result['samples_per_s']:.3f} samples/s")
    return result


def run(ctx: Any) -> dict[str, Any]:
    p = QUICK if ctx.quick else FULL
    with ctx.server() as url:
        return measure(ctx, url, dict(p))
