"""online: training beside serving on one server: what replay buys live, what serving pays.

One server (``--config``, default SmolLM2 bf16 on CPU; or ``--url``), started with
``train.round_s`` set to the run's round length (quick 12 s, full 30 s), and its own checkpoint
folder and feedback database under the output folder. Three arms alternate on it in blocks, all at
the same serving load (the same conversations and arrival times for every arm of a round; the
radix cache is flushed before every block). Round orders are cyclic rotations each followed by its
mirror (``eval.loadgen.ab.rotation_orders``): SRC, CRS, RCS, SCR, ... (S ``serving_only``, R
``replay``, C ``recompute``), so every pair of arms meets in both orders.
  ``serving_only``: ``POST /alchemist/train/pause`` in force; nothing is fed.
  ``replay`` / ``recompute``: while still paused, ``POST /alchemist/train/replay {"enabled": true
      / false}`` (it applies from the next round), then ``resume``; every completion served in the
      block is rated ``up`` through ``POST /v1/feedback`` after a delay (``--feedback-delay MEAN``:
      exponential per completion, mean MEAN s; 0, the default, = as soon as it finished), and the
      feedback not yet due when the block ends is dropped (``feeder.unsent``); ``pause`` at the
      end. Feeding every completion is meant to keep a backlog, so that the trainer is saturated
      in both training arms (``saturated_share`` says whether it was; ``notes`` if not).
A block is one open-loop Poisson session (``WORKLOADS``): ``--workload chitchat`` (default: multi-
turn chitchat conversations, up to 3 turns, 32 new tokens, 0.6 requests/s) or ``--workload
prompt-heavy`` (single-turn prompts of about 400-600 tokens, a chitchat transcript plus a short
request, 16 new tokens, 0.5 requests/s; ``eval.loadgen.workloads.prompt_heavy``), ``duration_s``
long plus up to ``drain_s`` for requests in flight.

Counting only whole rounds of the arm's setting: ``/alchemist/status`` is polled every ``poll_s``
in every block. A training block's window runs from the first to the last round that opened after
its resume (so with the arm's replay setting, checked against ``train.round.replay``); the
trainer's counters move only at round closes, so the window holds whole rounds trained with that
setting and none of the round left open by the block before (``_online_rounds``).

Fields per arm (``arms.serving_only|replay|recompute``):
  ``trained_tokens_per_s``, ``samples_trained_per_s``: ``tokens_trained`` / ``samples_trained``
      added in the arm's windows / the windows' seconds (pooled over blocks); round close,
      optimizer, gate and publish time all count, as they do live.
  ``train_busy_ms_per_token``: ``train.busy_ms`` added (work-unit ms of rounds) / tokens trained.
  ``ttft_p50``, ``ttft_p95``, ``tpot_p50`` (ms), ``radix_hit_rate`` (sum cached_tokens / sum
      prompt_tokens): every request of the arm's blocks.
  ``breakdown_ms_per_token`` ({gather, projections, attention, pointwise, lora, autograd_other}):
      null: ``/alchemist/status`` reports no per-part time of the trainer yet (it would be read as
      cumulative ms from ``train.breakdown_ms`` and divided by tokens trained).
  Also ``saturated_share`` (share of polls in the windows with ``samples_pending`` > 0, stale
  samples included: the trainer had work), ``lag0_share_samples``, ``samples_trained_by_lag``,
  ``prompt_tokens_by_fate``, ``reuse_by_lag``, ``prompt_coverage``, ``coverage_ceiling`` (as below,
  for that arm; in the recompute arm the server counts prompt tokens by fate where they would have
  come from, and ``reuse_by_lag`` stays empty), window seconds and rounds.
Top level:
  ``live_ratio``: median over rounds of blocks of (replay / recompute trained tokens per second);
      ``live_ratio_spread`` {min, max} of those ratios (``live_ratios``: all of them).
  ``feedback_delay_s``: the mean delay asked for (``feeder.delay_drawn_mean_s``: drawn).
  ``lag0_share_samples``: samples trained at lag 0 / samples trained, replay arm's windows
      (``samples_trained_by_lag`` deltas); ``samples_trained_by_lag``, ``prompt_tokens_by_fate``
      (lag0, approximate, stale_recomputed, hole, evicted) and ``reuse_by_lag`` are the replay arm's.
  ``prompt_coverage``: lag0 prompt tokens / all prompt tokens trained; ``coverage_ceiling``: 1 -
      hole / all prompt tokens trained (replay arm).
  ``stamp_to_feedback_s`` {p50, p90}: a completion's end (its last chunk read) to the start of
      its accepted feedback POST, on this process's clock (the drawn delay plus the posting lag).
  ``feedback_to_publish_s`` {p50, p90}: the server's own (intake to publish, its last 512
      samples) at the end of the run.
  ``publish_interval_s``: median seconds between round openings in training blocks (one publish
      per round); ``publish_share``: sum of ``publish_ms`` of the run's publishes / training blocks'
      wall seconds.
  ``store_retention_s``: the store's ``host_capacity_bytes`` / (``bytes_recorded_total`` added /
      run wall seconds): seconds until recordings at this load (all arms) would fill the host pool
      with nothing released (null without a ``store`` status block); ``recorded_bytes_per_s``.
  ``samples_by_fate``, ``samples_fed``: deltas over the run; ``deferred``, ``dropped`` from them.
  Older fields: ``samples_per_s`` (replay arm's samples_trained_per_s), ``reuse_by_lag``,
  ``publish_ms``, ``publish_stall_ms`` (medians over the run's ``publish.recent`` entries),
  ``radix_hit_rate_training_on/off``, ``ttft_p50/p95_training_on/off``,
  ``tpot_p50_training_on/off`` (on = replay arm, off = serving_only arm), ``failed_requests``
  (all arms), ``samples`` (feedback accepted by the server), ``publishes`` (delta).
Also ``per_block`` (one row per block), ``block_order``, ``requests_per_arm``, ``feeder``,
``samples_trained_while_serving_only`` (should be 0), versions and loss_ema at start and end,
``latency_samples`` and ``timeline`` for the report, and ``notes`` (unsaturated arms, blocks
without a whole round, a server given by ``--url``). Progress: a line per block, per round closed
and per 20 feedback accepted. ``--quick``: 2 rounds of 3 blocks of 50 s (sized for ~10 min with the
server's start and compile; it shows the pipeline works, with one or two whole rounds per training
block); the full run: 4 rounds of 3 blocks of 110 s (sized for ~30 min).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import httpx

from eval.experiments import _online_rounds as rr
from eval.loadgen.polling import BackgroundPoller
from eval.loadgen.ab import ABResult, Arm, rotation_orders, run_ab
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.feedback_feeder import FeedbackFeeder
from eval.loadgen.runner import LoadSpec
from eval.loadgen.stats import latency_samples, percentile
from eval.loadgen.training import CompletionSink, PublishLog, counter_delta, get_status, set_replay, train_control

NAME = "online"

ARMS = ("serving_only", "replay", "recompute")
REPLAY = {"replay": True, "recompute": False}
QUICK = {"rounds": 2, "duration_s": 50.0, "drain_s": 60.0, "round_s": 12.0, "poll_s": 1.0}
FULL = {"rounds": 4, "duration_s": 110.0, "drain_s": 120.0, "round_s": 30.0, "poll_s": 1.0}
SMOKE = {"rounds": 1, "duration_s": 12.0, "drain_s": 30.0, "round_s": 3.0, "poll_s": 0.5}  # --smoke
WORKLOADS = {"chitchat": {"rate_rps": 0.6, "max_turns": 3, "max_tokens": 32},
             "prompt-heavy": {"rate_rps": 0.5, "max_turns": 1, "max_tokens": 16}}
PROGRESS_SAMPLES = 20
SATURATED = 0.9  # below this share of polls with a backlog, an arm is reported as not saturated


def log(text: str) -> None:
    print(f"online {text}", flush=True)


def check_server(status: dict[str, Any], url: str) -> None:
    train = status.get("train")
    if not isinstance(train, dict) or "samples_trained" not in train:
        raise RuntimeError(f"the server at {url} reports no train section in /alchemist/status "
                           f"(disabled: {status.get('disabled')}); is the training loop wired?")
    if "busy_ms" not in train or "samples_by_fate" not in train:
        raise RuntimeError(f"the server at {url} reports no round counters (train.busy_ms, "
                           "train.samples_by_fate): a server from before rounds?")


class Poller(BackgroundPoller):
    """Polls ``/alchemist/status`` every ``interval_s`` on a thread while in a ``with``, once more
    on entry and exit: ``rows`` (``_online_rounds.status_row``, ``t`` = answer arrived on
    ``clock``) and the publish entries into ``publishes``."""

    def __init__(self, url: str, interval_s: float, clock: Callable[[], float], publishes: PublishLog,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.url, self.interval_s, self.clock, self.publishes, self.on_row = url, interval_s, clock, publishes, on_row
        self.rows: list[dict[str, Any]] = []
        self.errors = 0
        super().__init__(interval_s, "eval-online-poller")

    def poll(self) -> None:
        try:
            status = get_status(self.url, timeout_s=10.0)
        except Exception:  # noqa: BLE001 - a missed poll is counted, the trace goes on
            self.errors += 1
            return
        row = rr.status_row(status, self.clock())
        self.rows.append(row)
        self.publishes.add(status.get("publish"))
        if self.on_row is not None:
            self.on_row(row)



class OnlineRun:
    """The state one run accumulates; ``run_block`` is handed to ``run_ab``."""

    def __init__(self, ctx: Any, url: str, p: dict[str, Any], post: Callable | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx, self.url, self.p, self.clock = ctx, url, p, clock
        self.t_start = clock()
        self.arm = ARMS[0]
        self.blocks: list[dict[str, Any]] = []
        self.start = get_status(url)
        check_server(self.start, url)
        self.publishes = PublishLog.starting_at(self.start.get("publish"))
        self.feeder = FeedbackFeeder(url, p["feedback_delay_s"], seed=ctx.seed, clock=clock, post=post,
                                     on_accepted=self._fed)
        self.sink = CompletionSink(sink=self.feeder.put)

    def log(self, text: str) -> None:
        log(f"[{self.clock() - self.t_start:7.1f} s] {text}")

    def _fed(self, total: int) -> None:
        if total % PROGRESS_SAMPLES == 0:
            self.log(f"{total} feedback accepted")

    def set_arm(self, arm: str) -> None:
        self.arm = arm

    def _on_row(self, label: str, first: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
        last_key: list[Any] = [None]

        def on_row(row: dict[str, Any]) -> None:
            if not first:
                first.append(row)
            if last_key[0] is not None and row["key"] != last_key[0]:
                self.log(f"{label}: round closed, now {row['version']} (replay {row['round_replay']}); "
                         f"+{row['samples_trained'] - first[0]['samples_trained']:g} samples, "
                         f"+{row['tokens_trained'] - first[0]['tokens_trained']:g} tokens trained in the block, "
                         f"{row['pending']} pending")
            last_key[0] = row["key"]
        return on_row

    def _session(self, base_url: str, convs: Any, spec: LoadSpec, training: bool) -> tuple[Any, Poller]:
        poller = Poller(base_url, self.p["poll_s"], self.clock, self.publishes, self._on_row(spec.label, []))
        try:
            with poller:  # its last poll comes after the feedback due and before the pause
                try:
                    result = self.ctx.load(base_url, convs, spec, feedback=self.sink if training else None)
                finally:
                    if training:
                        self.feeder.stop()
        finally:
            if training:
                train_control(base_url, "pause")
        return result, poller

    def run_block(self, base_url: str, convs: Any, spec: LoadSpec) -> Any:
        arm, training = self.arm, self.arm in REPLAY
        fed0, unsent0 = self.feeder.accepted, self.feeder.unsent
        if training:
            set_replay(base_url, REPLAY[arm])  # paused: applies to the first round opened after resume
        t_from = self.clock()
        if training:
            train_control(base_url, "resume")
            self.feeder.start()
        result, poller = self._session(base_url, convs, spec, training)
        block = {"arm": arm, "label": spec.label, "round": int(spec.label.rsplit("#", 1)[1]),
                 "records": result.records, "wall_s": self.clock() - t_from,
                 "window": rr.training_window(poller.rows, REPLAY[arm], t_from) if training else None,
                 "intervals": rr.publish_intervals(poller.rows, t_from) if training else [],
                 "trained": (poller.rows[-1]["samples_trained"] - poller.rows[0]["samples_trained"]) if poller.rows
                 else 0.0,
                 "fed": self.feeder.accepted - fed0, "unsent": self.feeder.unsent - unsent0,
                 "poll_errors": poller.errors, "rows": poller.rows,
                 "timeline": _timeline(getattr(self.ctx, "last_timeline", []) or [], poller.rows, t_from)}
        self.blocks.append(block)
        row = block_row(block)
        self.log(f"block {len(self.blocks)} {spec.label}: {row['requests']} requests ({row['failed']} failed), "
                 f"TTFT p50 {row['ttft_p50']:.0f} ms, {row['fed']} fed, {row['samples_trained']:g} samples trained, "
                 f"window {row['window_s']:.0f} s / {row['rounds']} rounds, {row['trained_tokens_per_s']} tokens/s")
        return result


def _timeline(load: list[dict[str, Any]], rows: list[dict[str, Any]], t_from: float) -> list[dict[str, Any]]:
    polled = [{"t_s": r["t"] - t_from, "train_steps": r["key"][0], "train_samples_pending": r["pending"],
               "tokens_trained": r["tokens_trained"]} for r in rows]
    return sorted(list(load) + polled, key=lambda r: r["t_s"])


def block_row(b: dict[str, Any]) -> dict[str, Any]:
    """One row of ``per_block`` (scalars only)."""
    w = b["window"] or {}
    lat = rr.latency_numbers(b["records"])
    rate = rr.share(w.get("tokens_trained", 0.0), w.get("seconds", 0.0))
    return {"arm": b["arm"], "round": b["round"], "requests": lat["requests"], "failed": lat["failed_requests"],
            "ttft_p50": lat["ttft_p50"], "radix_hit_rate": lat["radix_hit_rate"], "fed": b["fed"],
            "unsent": b["unsent"], "samples_trained": b["trained"], "window_s": w.get("seconds", 0.0),
            "rounds": w.get("rounds", 0), "trained_tokens_per_s": None if rate is None else round(rate, 2),
            "saturated_share": w.get("saturated_share"), "wall_s": b["wall_s"], "poll_errors": b["poll_errors"]}


def _notes(arms: dict[str, dict[str, Any]], blocks: list[dict[str, Any]], url_given: bool) -> list[str]:
    notes = []
    for name in REPLAY:
        sat = arms[name]["saturated_share"]
        if sat is not None and sat < SATURATED:
            notes.append(f"{name}: the trainer had no backlog in {1 - sat:.0%} of the polls (not saturated)")
    missing = [b["label"] for b in blocks if b["arm"] in REPLAY and b["window"] is None]
    if missing:
        notes.append(f"no whole round with the arm's replay setting in blocks {missing} (blocks too short "
                     "for train.round_s?)")
    if url_given:
        notes.append("used --url as given: train.round_s, the checkpoint folder and the feedback database "
                     "were not set by the experiment")
    return notes


def assemble(run: OnlineRun, ab: ABResult, end: dict[str, Any], wall: float) -> dict[str, Any]:
    """The result dict from a finished run, ``wall`` seconds long (pure given its inputs)."""
    b, a = run.start.get("train") or {}, end.get("train") or {}
    by_arm = {arm: [blk for blk in run.blocks if blk["arm"] == arm] for arm in ARMS}
    arms = {arm: rr.arm_summary(blocks) for arm, blocks in by_arm.items()}
    on, off = arms["replay"], arms["serving_only"]
    ratios = rr.live_ratios(run.blocks, "replay", "recompute")
    ratio, spread = rr.median_and_spread(ratios)
    fates = rr.fate_delta(b.get("samples_by_fate") or {}, a.get("samples_by_fate") or {}, rr.SAMPLE_FATES)
    train_wall = sum(blk["wall_s"] for arm in REPLAY for blk in by_arm[arm])
    publish_ms = [float(e["publish_ms"]) for e in run.publishes.entries.values() if e.get("publish_ms") is not None]
    feeder = run.feeder.summary()
    return {
        "arms": arms, "live_ratio": ratio, "live_ratio_spread": spread, "live_ratios": ratios,
        "feedback_delay_s": run.p["feedback_delay_s"],
        "lag0_share_samples": on["lag0_share_samples"], "samples_trained_by_lag": on["samples_trained_by_lag"],
        "prompt_tokens_by_fate": on["prompt_tokens_by_fate"], "coverage_ceiling": on["coverage_ceiling"],
        "prompt_coverage": on["prompt_coverage"], "stamp_to_feedback_s": feeder["stamp_to_feedback_s"],
        "feedback_to_publish_s": a.get("feedback_to_publish_s"),
        "publish_interval_s": percentile([x for blk in run.blocks for x in blk["intervals"]], 50),
        "publish_share": rr.share(sum(publish_ms) / 1000.0, train_wall),
        **rr.store_retention_s(run.start, end, wall),
        "samples_by_fate": fates,
        "samples_fed": counter_delta(b, a, "samples_fed"),
        "deferred": fates.get("deferred", 0), "dropped": fates.get("dropped", 0),
        "samples_per_s": on["samples_trained_per_s"], "reuse_by_lag": on["reuse_by_lag"],
        "publish_ms": run.publishes.median("publish_ms"), "publish_stall_ms": run.publishes.median("stall_ms"),
        "radix_hit_rate_training_on": on["radix_hit_rate"], "radix_hit_rate_training_off": off["radix_hit_rate"],
        "ttft_p50_training_on": on["ttft_p50"], "ttft_p50_training_off": off["ttft_p50"],
        "ttft_p95_training_on": on["ttft_p95"], "ttft_p95_training_off": off["ttft_p95"],
        "tpot_p50_training_on": on["tpot_p50"], "tpot_p50_training_off": off["tpot_p50"],
        "failed_requests": sum(x["failed_requests"] for x in arms.values()),
        "samples": feeder["accepted"],
        "publishes": int(counter_delta(run.start.get("publish") or {}, end.get("publish") or {}, "publishes")),
        "requests_per_arm": min(x["requests"] for x in arms.values()),
        "samples_trained_while_serving_only": sum(blk["trained"] for blk in by_arm["serving_only"]),
        "block_order": list(ab.order), "radix_flushed_between_arms": ab.radix_flushed_between_arms,
        "weight_version_start": run.start.get("weight_version"), "weight_version_end": end.get("weight_version"),
        "loss_ema_start": b.get("loss_ema"), "loss_ema_end": a.get("loss_ema"), "run_wall_s": wall,
        "feeder": {k: v for k, v in feeder.items() if k != "errors"}, "feeder_errors": feeder["errors"],
        "per_block": {blk["label"]: block_row(blk) for blk in run.blocks},
        "notes": _notes(arms, run.blocks, bool(getattr(run.ctx, "url", None))),
        "latency_samples": {arm: latency_samples([r for blk in by_arm[arm] for r in blk["records"]]) for arm in ARMS},
        "timeline": {blk["label"]: blk["timeline"] for blk in run.blocks},
    }


def _leave_as_found(run: OnlineRun, was_replay: bool, was_paused: bool) -> None:
    """Puts ``train.replay`` and the pause back as the run found them; a failure is logged, so it
    never hides the error that ended a run early."""
    try:
        set_replay(run.url, was_replay)
        if not was_paused:
            train_control(run.url, "resume")
    except (httpx.HTTPError, RuntimeError) as exc:
        run.log(f"could not leave the server as found (replay {was_replay}, paused {was_paused}): {exc}")


def load_spec(p: dict[str, Any], seed: int) -> LoadSpec:
    w = WORKLOADS[p["workload"]]
    rate = p.get("rate_rps") or w["rate_rps"]
    per_block = int(rate * p["duration_s"] * 2) + 10  # the duration bounds a block, not the count
    return LoadSpec(ArrivalSpec(rate), per_block, duration_s=p["duration_s"], drain_s=p["drain_s"],
                    max_turns=w["max_turns"], max_tokens=w["max_tokens"], seed=seed)


def measure(ctx: Any, url: str, p: dict[str, Any], post: Callable | None = None,
            clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    run = OnlineRun(ctx, url, p, post=post, clock=clock)
    was_paused = bool((run.start.get("train") or {}).get("paused"))
    was_replay = bool((run.start.get("train") or {}).get("replay", True))
    spec = load_spec(p, ctx.seed)
    orders = rotation_orders(ARMS, p["rounds"])
    run.log(f"{p['rounds']} rounds of {'/'.join(ARMS)} blocks of {p['duration_s']:g} s, {p['workload']} at "
            f"{spec.arrivals.rate_rps:g} requests/s, feedback delay {p['feedback_delay_s']:g} s; orders "
            f"{[''.join(n[0].upper() for n in o) for o in orders]}; server at {run.start.get('weight_version')}")
    train_control(url, "pause")  # nothing trains outside the training blocks
    arms = [Arm(arm, url, (lambda a=arm: run.set_arm(a))) for arm in ARMS]
    try:
        ab = run_ab(arms, ctx.workload(min_turns=2), spec, p["rounds"], run.run_block, orders=orders)
    finally:
        _leave_as_found(run, was_replay, was_paused)
    end = get_status(url)
    run.publishes.add(end.get("publish"))
    result = assemble(run, ab, end, run.clock() - run.t_start)
    result.update(workload=p["workload"], round_s=None if getattr(ctx, "url", None) else p["round_s"],
                  rounds=p["rounds"], block_duration_s=p["duration_s"], rate_rps=spec.arrivals.rate_rps,
                  max_tokens=spec.max_tokens, max_turns=spec.max_turns)
    for note in result["notes"]:
        run.log(f"NOTE: {note}")
    run.log(f"done: live_ratio {result['live_ratio']} (spread {result['live_ratio_spread']}), lag0 share "
            f"{result['lag0_share_samples']}, {result['samples']} feedback accepted, {result['publishes']} publishes")
    return result


def run(ctx: Any) -> dict[str, Any]:
    p = dict(SMOKE if ctx.smoke else QUICK if ctx.quick else FULL,
             workload=getattr(ctx, "workload_name", "chitchat"),
             feedback_delay_s=float(getattr(ctx, "feedback_delay_s", 0.0)),
             rate_rps=getattr(ctx, "rate_rps", None))
    if getattr(ctx, "round_s", None):  # --round-s: blocks hold at least two whole rounds
        p.update(round_s=float(ctx.round_s), duration_s=max(p["duration_s"], 2.5 * float(ctx.round_s)))
    with ctx.server(overrides=[f"train.round_s={p['round_s']}"]) as url:  # its state: under ctx.out_dir
        return measure(ctx, url, p)
