"""spike: a burst of requests in the middle of a steady load, served alone and with training running.

One server (``--config``, default SmolLM2-135M bf16 on CPU; or ``--url``), started with
``memory.enabled=true`` (the arbiter under test) and its own checkpoint folder and feedback
database under the output folder. Two arms alternate on it in ABBA blocks (``run_ab``: the radix
cache is flushed before every block, both arms of a round replay the same conversations with the
same arrival times). Each block is one open-loop session (``SpikeProfile``): Poisson arrivals at
``base_rps`` for ``pre_s``, then ``burst_rps`` for ``burst_s``, then ``base_rps`` for ``post_s``,
multi-turn chitchat conversations (up to 3 turns, ``max_tokens`` new tokens each).
  ``serving_only``: ``POST /alchemist/train/pause`` is in force and nothing is fed.
  ``with_training``: ``resume`` at the block start, ``pause`` at its end; every completion served
      in the block is fed back at once (``{"completion_id", "rating": "up"}``), so the trainer has
      a backlog throughout and publishes at the config's cadence (``publish.every_steps: 1`` in
      the CPU configs: a publish after every step, inside the window).
Why one server with the admin pause rather than a second server with ``train.enabled=false``: the
arms then differ only in the trainer running (same process, compiled graphs, recording hooks, KV
pool, arbiter, machine state); sequential servers would add start-up and drift differences.

Every ``poll_s`` (both arms alike) ``/alchemist/status`` is polled: arbiter state and transitions,
train steps and units run, the serving version; a poll is dated when its answer arrives (the
answer comes through the scheduler: ``per_block.poll_latency_ms_p50`` is the trace's resolution). Clock: request times are seconds of the session;
the session's start on the wall clock comes from the times completions were handed over
(``clock_origin``), so polls and versions' ``created_at`` line up with requests to about a ms.
Fields (docs/results.md ``spike``):
  ``ttft_p95_serving_only``, ``ttft_p95_with_training`` (ms, all requests of the arm), ``ratio``
  (with training / serving only), ``failed_requests`` (both arms), ``requests_per_arm`` (the
  smaller arm), ``train_steps_during_run`` (train.steps deltas over the with-training blocks),
  ``train_resumed_after_s``: the longest over the with-training bursts of (first poll after the
  arbiter's yield at which it is TRAINING and ``units_run`` has grown) - (the burst's end, its last
  arrival slot); None when the arbiter never yielded or training never came back in the block.
Also: ``ttft_p95_by_phase`` (pre, burst, post, by send time), ``arbiter_transitions`` per arm
(status deltas) and per block the state changes seen (``per_block``, ``state_changes``);
publishes apart from the rest: ``publishes_during_run``, ``publish_stall_ms_median``/``_max``
(the copy that holds serving), ``publish_ms_median`` (first build unit to serving),
``ttft_p95_overlapping_publish_stall`` vs ``ttft_p95_clear_of_publish_stall`` (requests of the
with-training arm whose wait for their first token intersects a stall, widened by
``MARGIN_S``, vs the others; the same for whole publishes) and ``ratio_clear_of_publish`` (p95
TTFT of with-training requests clear of any publish / serving only). ``train_steps_while_serving_only``
should be 0. Progress lines go to stderr every ``PROGRESS_S`` and per block.
``--quick``: one round, short blocks (shows the pipeline; not the target sizes). The full run:
two rounds, about 350 requests per arm.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

from eval.experiments import _spike_trace as tr
from eval.loadgen.polling import BackgroundPoller
from eval.loadgen.ab import Arm, run_ab
from eval.loadgen.runner import LoadSpec
from eval.loadgen.stats import latency_samples, percentile
from eval.loadgen.training import CompletionSink, PublishLog, SampleFeeder, counter_delta, get_status, train_control

NAME = "spike"

QUICK = {"rounds": 1, "base_rps": 1.0, "pre_s": 20.0, "burst_s": 8.0, "burst_rps": 6.0, "post_s": 30.0,
         "max_tokens": 16, "drain_s": 180.0, "poll_s": 0.5, "min_requests": 0}
FULL = {"rounds": 2, "base_rps": 0.5, "pre_s": 90.0, "burst_s": 12.0, "burst_rps": 6.0, "post_s": 120.0,
        "max_tokens": 32, "drain_s": 300.0, "poll_s": 0.5, "min_requests": 300}
SMOKE = {"rounds": 1, "base_rps": 1.0, "pre_s": 5.0, "burst_s": 3.0, "burst_rps": 4.0, "post_s": 6.0,
         "max_tokens": 8, "drain_s": 60.0, "poll_s": 0.5, "min_requests": 0}  # --smoke
MAX_TURNS = 3
ARMS = ("off", "on")
LABELS = {"off": "serving_only", "on": "with_training"}
MARGIN_S = 0.05  # widening of publish spans: clock alignment and the mint after the copy
PROGRESS_S = 10.0
SAMPLE_LIMIT = 1_000_000  # the feeder never stops on a count: the trainer is kept busy


@dataclasses.dataclass(frozen=True)
class StampingSink(CompletionSink):
    """Notes the wall time each completion id is handed over (both arms: the clock alignment),
    and forwards it to ``sink`` when one is set (with training: the feeder). Posts no feedback."""

    stamps: dict = dataclasses.field(default_factory=dict)

    def body(self, completion_id: str, text: str, rng: Any) -> None:
        if completion_id:
            self.stamps[completion_id] = time.time()
        return super().body(completion_id, text, rng)


class StatusPoller(BackgroundPoller):
    """A thread polling ``/alchemist/status`` every ``interval_s`` (plus the answer's latency):
    ``rows`` (``trace_row``, ``t`` = wall time the answer arrived), the publish entries
    (``publish.recent``) and versions seen, and the latencies."""

    def __init__(self, url: str, interval_s: float, publishes: PublishLog,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.url, self.interval_s, self.publishes, self.on_row = url, interval_s, publishes, on_row
        self.rows: list[dict[str, Any]] = []
        self.versions: dict[str, dict[str, Any]] = {}
        self.errors = 0
        self.latencies: list[float] = []
        super().__init__(interval_s, "eval-spike-poller")

    def poll(self) -> None:
        sent = time.time()
        try:
            status = get_status(self.url, timeout_s=10.0)
        except Exception:  # noqa: BLE001 - a missed poll is counted, the trace goes on
            self.errors += 1
            return
        t = time.time()  # when the answer arrived: a resume is never dated early
        self.latencies.append(t - sent)
        row = tr.trace_row(status, t)
        self.rows.append(row)
        self.publishes.add(status.get("publish"))
        for v in status.get("versions") or []:
            if isinstance(v, dict) and v.get("name"):
                self.versions[str(v["name"])] = v
        if self.on_row is not None:
            self.on_row(row)



def log(text: str) -> None:
    print(f"spike {text}", file=sys.stderr, flush=True)


class SpikeRun:
    """The state one run accumulates; ``run_block`` is handed to ``run_ab``."""

    def __init__(self, ctx: Any, url: str, p: dict[str, Any], profile: tr.SpikeProfile,
                 post: Callable | None = None) -> None:
        self.ctx, self.url, self.p, self.profile = ctx, url, p, profile
        self.t_start = time.time()
        self.arm = "off"
        self.blocks: list[dict[str, Any]] = []
        self.start = get_status(url)
        if not isinstance(self.start.get("train"), dict):
            raise RuntimeError(f"{url} reports no train section in /alchemist/status "
                               f"(disabled: {self.start.get('disabled')}); is the training loop wired?")
        self.publishes = PublishLog.starting_at(self.start.get("publish"))
        self.feeder = SampleFeeder(url, SAMPLE_LIMIT, post=post)  # post: tests' fake transport

    def set_arm(self, arm: str) -> None:
        self.arm = arm

    def _progress(self, label: str, t_block: float, sink: StampingSink, first: dict[str, Any]) -> Callable:
        last = [time.time()]

        def on_row(row: dict[str, Any]) -> None:
            if row["t"] - last[0] < PROGRESS_S:
                return
            last[0] = row["t"]
            t = row["t"] - t_block
            log(f"[{row['t'] - self.t_start:7.1f} s] {label} t={t:6.1f} s ({self.profile.phase(t)}): "
                f"{len(sink.stamps)} completed, arbiter {row['state']} "
                f"(+{(row['transitions'] or 0) - (first['transitions'] or 0):g} transitions), "
                f"+{(row['steps'] or 0) - (first['steps'] or 0):g} steps, {row['pending']} pending")
        return on_row

    def run_block(self, base_url: str, convs: Any, spec: LoadSpec) -> Any:
        arm = self.arm
        sink = StampingSink(sink=self.feeder.put if arm == "on" else None)
        before = get_status(base_url)
        first = tr.trace_row(before, time.time())
        if arm == "on":
            train_control(base_url, "resume")
            self.feeder.start()
        t_call = time.time()
        poller = StatusPoller(base_url, self.p["poll_s"], self.publishes,
                              self._progress(spec.label, t_call, sink, first))
        try:
            with poller:
                result = self.ctx.load(base_url, convs, spec, feedback=sink)
        finally:
            if arm == "on":
                self.feeder.stop()
                train_control(base_url, "pause")
        after = get_status(base_url)
        origin = tr.clock_origin(result.records, sink.stamps) or t_call
        rows = tr.shifted(poller.rows, origin)
        block = {
            "arm": arm, "label": spec.label, "records": result.records, "rows": rows,
            "resume": tr.resumed_after(rows, self.profile.burst_start_s, self.profile.burst_end_s),
            "windows": tr.publish_windows(poller.versions.values(), self.publishes.entries, origin, time.time()),
            "steps": counter_delta(before.get("train") or {}, after.get("train") or {}, "steps"),
            "transitions": counter_delta(before.get("arbiter") or {}, after.get("arbiter") or {}, "transitions"),
            "poll_errors": poller.errors, "clock_aligned": origin != t_call,
            "poll_latency_ms_p50": percentile(poller.latencies, 50) * 1000.0,
            "timeline": list(getattr(self.ctx, "last_timeline", []) or [])
            + [{"t_s": r["t"], "train_steps": r["steps"]} for r in rows if r.get("steps") is not None],
        }
        self.blocks.append(block)
        row = block_row(block)
        log(f"[{time.time() - self.t_start:7.1f} s] block {len(self.blocks)} {spec.label} ({LABELS[arm]}): "
            f"{row['requests']} requests ({row['failed']} failed), TTFT p95 {row['ttft_p95_ms']:.0f} ms, "
            f"+{row['train_steps']:g} steps, +{row['transitions']:g} transitions, {row['publishes']} publishes, "
            f"resumed after {row['resumed_after_s']} s")
        return result


def block_row(b: dict[str, Any]) -> dict[str, Any]:
    """One row of ``per_block`` (scalars only)."""
    res = b["resume"]
    return {"arm": LABELS[b["arm"]], "requests": len(b["records"]),
            "failed": sum(1 for r in b["records"] if r.get("error") is not None),
            "ttft_p95_ms": tr.ttft_ms(b["records"]), "train_steps": b["steps"],
            "transitions": b["transitions"], "publishes": len(b["windows"]), "yielded": res["yielded"],
            "resumed_after_s": res["resumed_after_s"], "state_resumed_after_s": res["state_resumed_after_s"],
            "step_after_s": res["step_after_s"], "polls": len(b["rows"]), "poll_errors": b["poll_errors"],
            "poll_latency_ms_p50": b.get("poll_latency_ms_p50")}


def _split(blocks: list[dict[str, Any]], span: str) -> tuple[list, list]:
    inside, outside = [], []
    for b in blocks:  # each block's records and windows share that block's session clock
        i, o = tr.split_by_windows(b["records"], [w[span] for w in b["windows"]], MARGIN_S)
        inside += i
        outside += o
    return inside, outside


def assemble(blocks: list[dict[str, Any]], profile: tr.SpikeProfile, p: dict[str, Any],
             feeder: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result dict from the finished blocks (pure given its inputs)."""
    recs = {arm: [r for b in blocks if b["arm"] == arm for r in b["records"]] for arm in ARMS}
    on_blocks = [b for b in blocks if b["arm"] == "on"]
    off_p95, on_p95 = tr.ttft_ms(recs["off"]), tr.ttft_ms(recs["on"])
    resumed = [b["resume"]["resumed_after_s"] for b in on_blocks]
    windows = [w for b in on_blocks for w in b["windows"]]
    stalls = [float(w["stall_ms"]) for w in windows if w["stall_ms"] is not None]
    in_stall, clear_stall = _split(on_blocks, "stall")
    in_pub, clear_pub = _split(on_blocks, "publish")
    phases = {LABELS[arm]: {ph: tr.ttft_ms([r for r in recs[arm] if r.get("scheduled_s") is not None
                                                and profile.phase(r["scheduled_s"]) == ph]) for ph in tr.PHASES}
              for arm in ARMS}
    notes = []
    if any(x is None for x in resumed):
        notes.append("in some with-training block the arbiter was not seen yielding, or training was not "
                     "seen resuming before the block ended (per_block)")
    n_per_arm = min(len(recs["off"]), len(recs["on"]))
    if n_per_arm < p.get("min_requests", 0):
        notes.append(f"only {n_per_arm} requests per arm (wanted >= {p['min_requests']})")
    result = {
        "ttft_p95_serving_only": off_p95, "ttft_p95_with_training": on_p95, "ratio": tr.ratio(on_p95, off_p95),
        "failed_requests": sum(1 for arm in ARMS for r in recs[arm] if r.get("error") is not None),
        "train_steps_during_run": sum(b["steps"] for b in on_blocks),
        "train_resumed_after_s": None if not resumed or any(x is None for x in resumed) else max(resumed),
        "requests_per_arm": n_per_arm,
        "ttft_p50_serving_only": tr.ttft_ms(recs["off"], 50),
        "ttft_p50_with_training": tr.ttft_ms(recs["on"], 50),
        "ttft_p95_by_phase": phases,
        "train_steps_while_serving_only": sum(b["steps"] for b in blocks if b["arm"] == "off"),
        "arbiter_transitions": {LABELS[arm]: sum(b["transitions"] for b in blocks if b["arm"] == arm)
                                for arm in ARMS},
        "arbiter_yielded_every_burst": bool(on_blocks) and all(b["resume"]["yielded"] for b in on_blocks),
        "publishes_during_run": len(windows),
        "publish_stall_ms_median": percentile(stalls, 50), "publish_stall_ms_max": max(stalls, default=None),
        "publish_ms_median": percentile([float(w["publish_ms"]) for w in windows if w["publish_ms"] is not None], 50),
        "requests_overlapping_publish_stall": len(in_stall),
        "ttft_p95_overlapping_publish_stall": tr.ttft_ms(in_stall),
        "ttft_p95_clear_of_publish_stall": tr.ttft_ms(clear_stall),
        "requests_overlapping_publish": len(in_pub),
        "ttft_p95_overlapping_publish": tr.ttft_ms(in_pub),
        "ttft_p95_clear_of_publish": tr.ttft_ms(clear_pub),
        "ratio_clear_of_publish": tr.ratio(tr.ttft_ms(clear_pub), off_p95),
        "profile": dataclasses.asdict(profile), "expected_requests_per_block": profile.expected_requests(),
        "block_order": [b["arm"] for b in blocks],
        "clock_aligned_every_block": all(b["clock_aligned"] for b in blocks),
        "per_block": {b["label"]: block_row(b) for b in blocks},
        "state_changes": {b["label"]: tr.state_changes(b["rows"]) for b in blocks},
        "publish_windows": {b["label"]: [{k: w[k] for k in ("version", "at_s", "stall_ms", "publish_ms")}
                                         for w in b["windows"]] for b in on_blocks},
        "latency_samples": {LABELS[arm]: latency_samples(recs[arm]) for arm in ARMS},
        "timeline": {b["label"]: sorted(b["timeline"], key=lambda r: r["t_s"]) for b in blocks},
    }
    if feeder is not None:
        result["feeder"] = {k: v for k, v in feeder.items() if k != "errors"}
        result["feeder_errors"] = feeder.get("errors", [])
    if notes:
        result["notes"] = notes
    return result


def measure(ctx: Any, url: str, p: dict[str, Any], post: Callable | None = None) -> dict[str, Any]:
    profile = tr.SpikeProfile(p["base_rps"], p["pre_s"], p["burst_s"], p["burst_rps"], p["post_s"])
    run = SpikeRun(ctx, url, p, profile, post=post)
    was_paused = bool((run.start.get("train") or {}).get("paused"))
    spec = LoadSpec(profile.arrivals(), 100_000, duration_s=profile.duration_s, drain_s=p["drain_s"],
                    max_turns=MAX_TURNS, max_tokens=p["max_tokens"], seed=ctx.seed)
    arbiter = run.start.get("arbiter") or {}
    log(f"{p['rounds']} round(s) x 2 blocks of {profile.duration_s:.0f} s: {p['base_rps']:g} rps, a burst of "
        f"{p['burst_rps']:g} rps for {p['burst_s']:g} s at t={p['pre_s']:g} s (~{profile.expected_requests():.0f} "
        f"requests a block); arbiter {arbiter.get('state')} (enabled {arbiter.get('is_enabled')}); "
        f"server at {run.start.get('weight_version')}")
    train_control(url, "pause")  # nothing trains before the first with-training block
    arms = [Arm(arm, url, (lambda a=arm: run.set_arm(a))) for arm in ARMS]
    try:
        run_ab(arms, ctx.workload(min_turns=2), spec, p["rounds"], run.run_block)
    finally:
        if not was_paused:
            train_control(url, "resume")  # leave the server as found
    result = assemble(run.blocks, profile, p, run.feeder.summary())
    result["arbiter_enabled"] = arbiter.get("is_enabled")
    if ctx.url is not None:
        result.setdefault("notes", []).append(f"used {ctx.url} as given: memory.enabled and the "
                                              "checkpoint folder were not set by the experiment")
    log(f"done: ratio {result['ratio']:.3f} (p95 TTFT {result['ttft_p95_with_training']:.0f} / "
        f"{result['ttft_p95_serving_only']:.0f} ms), {result['failed_requests']} failed, "
        f"{result['train_steps_during_run']:g} steps, resumed after {result['train_resumed_after_s']} s, "
        f"{result['publishes_during_run']} publishes")
    return result


def run(ctx: Any) -> dict[str, Any]:
    p = dict(SMOKE if ctx.smoke else QUICK if ctx.quick else FULL)
    with ctx.server(overrides=["memory.enabled=true"]) as url:  # its state: under ctx.out_dir
        return measure(ctx, url, p)
