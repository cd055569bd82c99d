"""The online loop: pending samples -> work-unit steps -> gate -> publish -> a new version id.

Owns ``OnlineLoop``, which the runtime drives once per scheduler iteration with a time slice
(``run_slice``). It composes the trainer (train/), the sample queue, the version registry, the
publisher, the gate and checkpoints (online/), and reaches the server only through two small
protocols built in ``integration/``: ``ServingHost`` (may a publish happen now; announce a version)
and ``RecordingSource`` (pin, read and unpin a prompt's recording). Never imports sglang.

Contract: every method runs on the scheduler thread between scheduler iterations (quiescent), so
nothing here locks. A method that raises must be caught by the caller, which disables training
loudly and keeps serving (Note [fail loudly, keep serving] in integration/plugin.py).

Note [Work as a generator]: one step is a generator that performs exactly one work unit per
``next()`` (a decoder layer's forward or backward for one sample, a loss chunk, the optimizer, one
layer of the publish build, the copy, a checkpoint) and yields its kind (``"train"``, ``"gate"``, ``"publish.build"``, ...), or yields ``_WAIT`` when
it cannot go on in this iteration (a chunked prefill is in flight and a publish must wait).
``run_slice`` advances it until the slice budget is spent. Between two ``next()`` calls SGLang
serves; in-flight requests are never touched.

Note [Lag in training states]: a recording made at version p is exact for the trainer only while
the trainer's weights are still p's. Lag = hops from p to the serving version along the lineage
(None across a branch: infinite) + optimizer steps taken since the last publish. With the default
``publish.every_steps: 1`` every step starts at lag 0 for what was served since the last publish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from alchemist_sgl.log import get_logger
from alchemist_sgl.online.lifecycle import LoopLifecycle, without_handle
from alchemist_sgl.online.publish import MasterWeights, Publisher
from alchemist_sgl.online.writer import BackgroundWriter
from alchemist_sgl.train.samples import PromptSegment, Recording, Sample

logger = get_logger(__name__)

_WAIT = "wait"
_STALE = 10**9  # a lag no max_version_lag accepts (a recording across a branch)


class ServingHost(Protocol):
    def can_publish(self) -> bool:
        """True when the live weights may change now (no chunked prefill in flight)."""

    def announce(self, version: str) -> None:
        """The served weights are now ``version``: stamp new admissions, SGLang's weight_version."""


class RecordingSource(Protocol):
    def pin(self, prompt_ids: list[int], version: str) -> Any: ...
    def segments(self, handle: Any) -> list[tuple[int, int, dict[str, torch.Tensor] | None]]: ...
    def unpin(self, handle: Any) -> None: ...
    def release_versions(self, is_live: Callable[[str], bool]) -> int: ...


@dataclass
class LoopCounters:
    """Cumulative numbers of the loop (checkpointed; ``train``/``publish`` status blocks)."""

    steps: int = 0
    attempts: int = 0             # steps begun, skipped ones included (test injection counts these)
    train_state: int = 0          # optimizer steps ever taken on this lineage (Note [Lag ...])
    steps_since_publish: int = 0
    steps_since_checkpoint: int = 0
    units_run: int = 0
    slices: int = 0
    units_over_budget: int = 0
    max_unit_ms: float = 0.0
    max_unit_ms_by_kind: dict[str, float] = field(default_factory=dict)
    max_slice_ms: float = 0.0
    nonfinite_skipped: int = 0
    publishes: int = 0
    rejected: int = 0
    last_step_ms: float | None = None
    last_loss: float | None = None
    last_step_tokens: int | None = None
    last_grad_norm: float | None = None
    last_publish_ms: float | None = None
    last_stall_ms: float | None = None
    last_publish_at: float = 0.0
    recent_publishes: list[dict[str, Any]] = field(default_factory=list)
    window_cached_tokens: int = 0   # radix hits of requests finished since the last publish ...
    window_prompt_tokens: int = 0   # ... over their prompt tokens (Note [Radix hit rate])


@dataclass(frozen=True)
class SliceReport:
    units: int
    ms: float
    units_over_budget: int


class OnlineLoop(LoopLifecycle):
    """Trains on pending samples in work units and publishes each step as a new version."""

    def __init__(self, *, config: Any, trainer: Any, queue: Any, registry: Any, checkpoints: Any,
                 checkpoint_meta: Any, publisher: Publisher, master: MasterWeights,
                 host: ServingHost, recordings: RecordingSource | None, adapters: Any,
                 gate_pairs: list[Sample] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.trainer, self.queue, self.registry = config, trainer, queue, registry
        self.checkpoints, self.meta = checkpoints, checkpoint_meta
        self.publisher, self.master, self.host, self.recordings = publisher, master, host, recordings
        self.adapters = adapters  # online.adapters-like: save/load/prune (module or object)
        self.gate_pairs = gate_pairs or []
        self.clock = clock
        self.counters = LoopCounters(last_publish_at=clock())
        self.writer = BackgroundWriter()  # Note [Writes off the serving path] in writer.py
        # Called with (feedback ids, step) after a step that trained feedback samples.
        self.on_feedback_trained: Callable[[list[str], int], None] | None = None
        self.is_paused = False
        self.inject_nonfinite_steps: set[int] = set()  # tests: 1-based attempt numbers to poison
        self._work: Iterator[str] | None = None
        self._inflight: list[Any] = []
        self._state = "idle"
        self._accepted = self._trainer_snapshot()

    # ------------------------------------------------------------------ driving
    @property
    def has_work(self) -> bool:
        """True while not paused and a step is under way or could start now (then SGLang's idle
        sleep is skipped)."""
        if self.is_paused:
            return False
        if self._work is not None:
            return True
        tc = self.config.train
        return self.queue.is_ready(tc.min_pending_samples, tc.max_wait_s) or self._is_publish_due()

    def _is_publish_due(self) -> bool:
        """A step is unpublished and ``publish.every_s`` has passed (no new sample needed)."""
        from alchemist_sgl.online.cadence import should_publish  # noqa: PLC0415

        c, pc = self.counters, self.config.publish
        return c.steps_since_publish > 0 and should_publish(
            c.steps_since_publish, self.clock() - c.last_publish_at, pc.every_steps, pc.every_s)

    @property
    def has_step_in_progress(self) -> bool:
        return self._work is not None

    def yield_memory(self) -> int:
        """The arbiter left TRAINING (runtime.py): a step under way moves its saved tensors to host
        and releases workspace (train/offload.py, Note [Yield moves memory]); its backward reloads
        them when training resumes. Bytes moved (0 without ``memory.offload`` or a step)."""
        off = getattr(self.trainer, "residency", None)
        if off is None or self._work is None:
            return 0
        return off.yield_memory()

    def run_slice(self, budget_ms: float) -> SliceReport:
        """Runs work units until ``budget_ms`` is spent (at least one unit when work is ready)."""
        c = self.counters
        self.writer.drain()
        t0 = time.perf_counter()
        units = over = 0
        while units == 0 or (time.perf_counter() - t0) * 1000.0 < budget_ms:
            if self._work is None:
                if not self.has_work:
                    break
                tc = self.config.train
                is_step = self.queue.is_ready(tc.min_pending_samples, tc.max_wait_s)
                self._work = self._one_step() if is_step else self._publish_pending()
            u0 = time.perf_counter()
            try:
                kind = next(self._work)
            except StopIteration:
                self._work = None
                continue
            if kind == _WAIT:
                break
            unit_ms = (time.perf_counter() - u0) * 1000.0
            units += 1
            c.max_unit_ms = max(c.max_unit_ms, unit_ms)
            c.max_unit_ms_by_kind[kind] = max(c.max_unit_ms_by_kind.get(kind, 0.0), unit_ms)
            if unit_ms > budget_ms:
                over += 1
        if units:
            ms = (time.perf_counter() - t0) * 1000.0
            c.slices += 1
            c.units_run += units
            c.units_over_budget += over
            c.max_slice_ms = max(c.max_slice_ms, ms)
            return SliceReport(units, ms, over)
        return SliceReport(0, 0.0, 0)

    def abandon_step(self) -> None:
        """Drops the step under way (rollback, shutdown): its samples go back to the queue front."""
        if self._work is not None:
            self._work.close()
            self._work = None
        self.publisher.abandon()
        if self._inflight:
            self._release(self._inflight)
            self.queue.requeue_front([without_handle(p) for p in self._inflight])
            self._inflight = []
        self._state = "idle"

    def note_finished_request(self, cached_tokens: int, prompt_tokens: int) -> None:
        """Note [Radix hit rate]: every finished request adds to the current publish window; a
        publish records the window's rate (``radix_hit_rate_before``) and opens a new one, so the
        rate after publish k is the "before" of publish k+1, and ``radix_hit_rate_since_publish``
        is the running one."""
        self.counters.window_cached_tokens += int(cached_tokens)
        self.counters.window_prompt_tokens += int(prompt_tokens)

    def _close_radix_window(self) -> float | None:
        c = self.counters
        rate = c.window_cached_tokens / c.window_prompt_tokens if c.window_prompt_tokens else None
        c.window_cached_tokens = c.window_prompt_tokens = 0
        return rate

    # ------------------------------------------------------------------ one step
    def _one_step(self) -> Iterator[str]:
        tc, c = self.config.train, self.counters
        pending = self.queue.take(tc.batch_samples)
        self._inflight = pending
        self._state = "training"
        t0 = time.perf_counter()
        self.trainer.version = c.train_state
        run = self.trainer.begin_step([self._to_sample(p) for p in pending])
        c.attempts += 1
        if c.attempts in self.inject_nonfinite_steps:
            run.inject_nonfinite()
        while not run.is_done:
            run.run_unit()
            yield "train"
        stats = run.finish()
        self._release(pending)
        self._inflight = []
        step_ms = (time.perf_counter() - t0) * 1000.0
        if stats.is_nonfinite_skipped:
            c.nonfinite_skipped += 1
            logger.warning("step skipped: non-finite loss or gradients (%d samples dropped, "
                           "nothing published)", len(pending))
            self._state = "idle"
            return
        c.steps += 1
        c.train_state += 1
        trained = [p.feedback_id for p in pending if p.feedback_id is not None]
        if trained and self.on_feedback_trained is not None:
            self.on_feedback_trained(trained, c.steps)
        c.steps_since_publish += 1
        c.steps_since_checkpoint += 1
        c.last_step_ms = step_ms
        c.last_loss = stats.loss
        c.last_step_tokens = stats.tokens
        c.last_grad_norm = getattr(run, "grad_norm", None)
        logger.info("train step %d: loss %.4f samples %d tokens %d replayed %d recomputed %d "
                    "stale %d units %d ms %.0f", c.steps, stats.loss, stats.samples, stats.tokens,
                    stats.replayed_tokens, stats.recomputed_tokens, stats.stale_recomputes,
                    stats.units, step_ms)
        from alchemist_sgl.online.cadence import should_checkpoint, should_publish  # noqa: PLC0415

        pc = self.config.publish
        if should_publish(c.steps_since_publish, self.clock() - c.last_publish_at,
                          pc.every_steps, pc.every_s):
            yield from self._publish()
        if should_checkpoint(c.steps_since_checkpoint, tc.checkpoint_every_steps):
            self.checkpoint()
            yield "checkpoint"
        self._state = "idle"

    def _publish_pending(self) -> Iterator[str]:
        """A publish without a new step (``publish.every_s`` passed with a step unpublished)."""
        yield from self._publish()
        self._state = "idle"

    def _to_sample(self, p: Any) -> Sample:
        """A trainer ``Sample`` with its recording's segments labelled by lag (Note [Lag ...])."""
        segments: tuple[PromptSegment, ...] = ()
        if p.handle is not None and self.recordings is not None:
            hops = self.registry.lag(p.prefill_version, self.registry.serving.name)
            lag = _STALE if hops is None else hops + self.counters.steps_since_publish
            version = self.counters.train_state - lag
            segments = tuple(
                PromptSegment(s, e, None if t is None else Recording(version, t))
                for s, e, t in self.recordings.segments(p.handle))
        ref = None if p.ref_logprobs is None else torch.tensor(p.ref_logprobs, dtype=torch.float32)
        return Sample(p.prompt_ids, p.response_ids, segments, p.kind, p.weight, ref)

    def _release(self, pending: list[Any]) -> None:
        for p in pending:
            if p.handle is not None and self.recordings is not None:
                self.recordings.unpin(p.handle)
                p.handle = None

    # ------------------------------------------------------------------ publish
    def _publish(self) -> Iterator[str]:
        c, gc = self.counters, self.config.publish.gate
        self._state = "publishing"
        t0 = time.perf_counter()
        frozen = self.trainer.adapter.snapshot()
        metric = None
        if gc.is_enabled and self.gate_pairs and (c.publishes + c.rejected) % gc.every == 0:
            self._state = "gating"
            decision = yield from self._gate()
            metric = decision.metric
            if not decision.is_accepted:
                self._reject(decision, metric)
                return
        self._state = "publishing"
        self.publisher.begin(frozen)
        while not self.publisher.is_built:
            self.publisher.run_unit()
            yield "publish.build"
        while not self.host.can_publish():
            yield _WAIT
        stall_ms = self.publisher.commit()
        self.trainer.set_published(frozen)
        version = self.registry.mint(step=c.steps, parent=self.registry.serving.name, metric=metric)
        self.host.announce(version.name)
        if self.recordings is not None:  # store Note [Store lifetime]: the others never replay again
            lag_max = self.config.train.max_version_lag
            self.recordings.release_versions(
                lambda v: (lag := self.registry.lag(v, version.name)) is not None and lag <= lag_max)
        yield "publish.commit"
        self._save_adapter(version.name)
        c.steps_since_publish = 0
        c.publishes += 1
        c.last_publish_at = self.clock()
        publish_ms = (time.perf_counter() - t0) * 1000.0
        c.last_publish_ms, c.last_stall_ms = publish_ms, stall_ms
        c.recent_publishes = (c.recent_publishes + [
            {"version": version.name, "publish_ms": publish_ms, "stall_ms": stall_ms,
             "radix_hit_rate_before": self._close_radix_window()}])[-64:]
        logger.info("publish %s (step %d, parent %s): build+copy %.0f ms, stall %.1f ms",
                    version.name, c.steps, version.parent, publish_ms, stall_ms)
        if gc.is_enabled:
            self._accepted = self._trainer_snapshot()
        yield "publish.save"

    def _gate(self) -> Iterator[str]:
        from alchemist_sgl.online.gate import decide  # noqa: PLC0415

        gc = self.config.publish.gate
        if self.registry.v0_metric() is None and self.registry.serving.name == "v0":
            v0 = yield from self._score("published")
            self.registry.set_metric("v0", v0)
        last = self.registry.last_accepted_metric()
        if last is None:
            last = yield from self._score("published")
            self.registry.set_metric(self.registry.serving.name, last)
        candidate = yield from self._score("trained")
        v0 = self.registry.v0_metric()
        decision = decide(candidate, last, v0 if v0 is not None else last,
                          gc.max_regression, gc.max_regression_total)
        logger.info("gate: candidate NLL %.4f, last accepted %.4f, v0 %s: %s", candidate, last,
                    "%.4f" % v0 if v0 is not None else "n/a", decision.reason)
        return decision

    def _score(self, which: str) -> Iterator[str]:
        run = self.trainer.begin_scoring(self.gate_pairs, which)
        while not run.is_done:
            run.run_unit()
            yield "gate"
        return run.result()

    def _reject(self, decision: Any, metric: float) -> None:
        c = self.counters
        rejected = self.registry.mint(step=c.steps, parent=self.registry.serving.name,
                                      metric=metric, is_rejected=True)
        self._restore_trainer(self._accepted)
        c.rejected += 1
        c.train_state += 1  # the rejected steps' recordings are never replayed exactly again
        c.steps_since_publish = 0
        c.last_publish_at = self.clock()
        logger.warning("gate rejected %s: %s; trainer back at %s", rejected.name, decision.reason,
                       self.registry.serving.name)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, dict[str, Any]]:
        c, t = self.counters, self.trainer.status()
        train = {**t, "steps": c.steps, "samples_pending": len(self.queue),
                 "paused": self.is_paused, "state": "paused" if self.is_paused else self._state,
                 "units_run": c.units_run, "slices": c.slices,
                 "units_over_budget": c.units_over_budget, "max_unit_ms": c.max_unit_ms,
                 "max_unit_ms_by_kind": dict(c.max_unit_ms_by_kind),
                 "max_slice_ms": c.max_slice_ms, "nonfinite_skipped": c.nonfinite_skipped,
                 "last_step_ms": c.last_step_ms, "last_loss": c.last_loss,
                 "last_step_tokens": c.last_step_tokens, "last_grad_norm": c.last_grad_norm,
                 "learning_rate": self.trainer.optimizer.param_groups[0]["lr"],
                 "writes_pending": self.writer.pending, "write_failures": self.writer.failures}
        publish = {"publishes": c.publishes, "rejected": c.rejected,
                   "last_publish_ms": c.last_publish_ms, "last_stall_ms": c.last_stall_ms,
                   "master_bytes": self.master.bytes, "recent": list(c.recent_publishes),
                   "radix_hit_rate_since_publish": (c.window_cached_tokens / c.window_prompt_tokens
                                                    if c.window_prompt_tokens else None)}
        return {"train": train, "publish": publish}
