"""The online loop: rounds of fresh samples -> one optimizer step -> gate -> publish -> a new id.

Owns ``OnlineLoop``, which the runtime drives once per scheduler iteration with a time slice
(``run_slice``). It composes the trainer (train/), the sample queue, the version registry, the
publisher, the gate and checkpoints (online/), and reaches the server only through two small
protocols built in ``integration/``: ``ServingHost`` (may a publish happen now; announce a version)
and ``RecordingSource`` (pin, read and unpin a prompt's recording). Never imports sglang.

Contract: every method runs on the scheduler thread between scheduler iterations (quiescent), so
nothing here locks. A method that raises must be caught by the caller, which disables training
loudly and keeps serving (Note [fail loudly, keep serving] in integration/plugin.py).

Note [Rounds]: one open optimizer step per served version. Right after a commit the loop opens a
round at the new version V (``train.rounds.RoundRun``). Samples join it one at a time as they
arrive, in lane order (intake.py, Note [Lanes]): each runs its forward and backward work units and
leaves its gradient in the adapter, with no batch cap. The round closes once it holds
``train.round_max_samples`` samples or ``train.round_s`` has passed since it opened, whichever is
first, and never empty; then come the optimizer unit, the gate, the publish build, the commit and
a new id, and the next round opens. The weights and the adapter stay V's until the optimizer unit,
so a sample served at V replays its recording exactly (lag 0). At every publish the pins of
samples now beyond ``train.max_version_lag`` are released (their recordings are never read), and
stale samples older than ``train.stale_max_age_s`` leave the queue: feedback rows are deferred
(back to the feedback table), admin samples dropped (accounting.py, Note [Sample fates]).

Note [Work as a generator]: each piece of work (one sample's units; a round's close: optimizer,
gate, publish, checkpoint) is a generator that performs exactly one work unit per ``next()`` and
yields its kind (``"train"``, ``"gate"``, ``"publish.build"``, ...), or yields ``_WAIT`` when it
cannot go on in this iteration (a chunked prefill is in flight and a publish must wait).
``run_slice`` advances it until the slice budget is spent. Between two ``next()`` calls SGLang
serves; in-flight requests are never touched.

Note [Lag in training states]: a recording made at version p is exact for the trainer only while the
trainer's weights are still p's. Lag = hops from p to the serving version along the lineage (None
across a branch: infinite). Within a round the trainer's weights are the serving version's: lag 0.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, Sequence

from alchemist_sgl.config import Config
from alchemist_sgl.log import get_logger
from alchemist_sgl.online.accounting import RoundTally, SampleFates, TakenSample
from alchemist_sgl.online.cadence import should_checkpoint, should_close_round
from alchemist_sgl.online.checkpoint import CheckpointMeta, CheckpointStore
from alchemist_sgl.online.gate import GateDecision
from alchemist_sgl.online.gate_run import gate_units
from alchemist_sgl.online.intake import PendingSample, SampleQueue
from alchemist_sgl.online.lifecycle import VersionKeeper, without_handle
from alchemist_sgl.online.loop_status import loop_status
from alchemist_sgl.online.loop_types import (FeedbackSink, LoopCounters, OpenRound,
                                             RecordedSegment, RecordingSource, ServingHost,
                                             SliceReport)
from alchemist_sgl.online.recorded_sample import build_sample
from alchemist_sgl.online.work import WAIT, Work, WorkSlot
from alchemist_sgl.online.publish import MasterWeights, Publisher
from alchemist_sgl.online.versions import VersionRegistry
from alchemist_sgl.online.disk_writer import BackgroundWriter
from alchemist_sgl.train.samples import Sample
from alchemist_sgl.train.trainer import ReplayTrainer

logger = get_logger(__name__)

_STALE = 10**9  # a lag no max_version_lag accepts (a recording across a branch)


class OnlineLoop:
    """Trains rounds of samples in work units and publishes each round as a new version.

    ``queue`` and ``fates`` are shared with the feedback poller (feedback_poll.py), which queues
    feedback samples and is told what became of them through ``feedback``.
    ``inject_nonfinite_steps``: tests only, 1-based round numbers whose gradients are poisoned."""

    def __init__(self, *, config: Config, trainer: ReplayTrainer, queue: SampleQueue,
                 fates: SampleFates, registry: VersionRegistry, checkpoints: CheckpointStore,
                 checkpoint_meta: CheckpointMeta, publisher: Publisher, master: MasterWeights,
                 host: ServingHost, recordings: RecordingSource | None,
                 feedback: FeedbackSink | None = None, gate_pairs: list[Sample] | None = None,
                 inject_nonfinite_steps: frozenset[int] = frozenset(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.trainer, self.queue, self.registry = config, trainer, queue, registry
        self.publisher, self.master, self.host, self.recordings = publisher, master, host, recordings
        self.feedback = feedback
        self.gate_pairs = gate_pairs or []
        self.clock = clock
        self.counters = LoopCounters(last_publish_at=clock(), last_checkpoint_at=clock())
        self.fates, self.tally = fates, RoundTally()
        self.writer = BackgroundWriter()  # Note [Writes off the serving path] in disk_writer.py
        self.versions = VersionKeeper(config=config, trainer=trainer, registry=registry,
                                      publisher=publisher, host=host, writer=self.writer,
                                      checkpoints=checkpoints, meta=checkpoint_meta, clock=clock)
        self.is_paused = False
        self.is_replay_enabled = bool(config.train.replay)  # from the next round on (set_replay)
        self.round_s = float(config.train.round_s)  # debug.round_s may change it (experiments)
        self.inject_nonfinite_steps = inject_nonfinite_steps
        self.work = WorkSlot(self.counters)  # Note [Work as a generator]
        self.current_round: OpenRound | None = None
        self._inflight: list[PendingSample] = []
        self.state = "idle"

    # ------------------------------------------------------------------ driving
    @property
    def has_work(self) -> bool:
        """True while not paused and a unit could run now (then SGLang's idle sleep is skipped)."""
        if self.is_paused:
            return False
        return self.work.current is not None or len(self.queue) > 0 or self._is_close_due()

    @property
    def has_step_in_progress(self) -> bool:
        return self.work.current is not None

    def offer(self, samples: list[PendingSample]) -> int:
        """Queues new samples (all or none; ``QueueFull``) and counts them fed."""
        accepted = self.queue.offer(samples)
        self.fates.fed += accepted
        return accepted

    def set_replay(self, is_enabled: bool) -> dict[str, Any]:
        """``train.replay`` from the next round on (the benchmark's replay and recompute arms)."""
        self.is_replay_enabled = bool(is_enabled)
        current = self.current_round.is_replay_enabled if self.current_round is not None else is_enabled
        return {"replay": self.is_replay_enabled, "current_round_replay": current}

    def lag_of(self, p: PendingSample) -> int | None:
        """Versions from the sample's prefill to the serving one (None: a branch or never served)."""
        if p.prefill_version is None:
            return None
        hops = self.registry.lag(p.prefill_version, self.registry.serving.name)
        return None if hops is None else hops + self.counters.steps_since_publish

    def yield_memory(self) -> int:
        """The arbiter left TRAINING (runtime.py): a sample under way moves its saved tensors to
        host and releases workspace (train/offload.py, Note [Yield moves memory]); its backward
        reloads them when training resumes. Bytes moved (0 without ``memory.offload`` or work)."""
        off = self.trainer.residency
        if off is None or self.work.current is None:
            return 0
        return off.yield_memory()

    def run_slice(self, budget_ms: float) -> SliceReport:
        """Runs work units until ``budget_ms`` is spent (at least one unit when work is ready)."""
        self.writer.drain()
        return self.work.run_slice(budget_ms,
                                   lambda: None if self.is_paused else self._next_work())

    def abandon_step(self) -> None:
        """Drops the round under way (rollback, shutdown): its samples, and the one in progress,
        go back to the queue front (their recordings are recomputed)."""
        self.work.close()
        self.publisher.abandon()
        back: list[PendingSample] = []
        if self.current_round is not None:
            self.current_round.run.abandon()
            back = list(self.current_round.taken)
            self.current_round = None
        if self._inflight:
            self._release(self._inflight)
            back += self._inflight
            self._inflight = []
        if back:
            self.queue.requeue_front([without_handle(p) for p in back])
        self.state = "idle"

    def note_finished_request(self, cached_tokens: int, prompt_tokens: int) -> None:
        """A finished request's radix hits (loop_types.py, Note [Radix hit rate])."""
        self.counters.add_finished_request(cached_tokens, prompt_tokens)

    # ------------------------------------------------------------------ versions (lifecycle.py)
    def rollback(self, to: str) -> dict[str, Any]:
        """Serves ``to``'s weights, adapter and AdamW state under a new id (one call); raises as
        ``VersionKeeper.rollback_target`` and ``serve_again`` do."""
        target = self.versions.rollback_target(to)
        self.abandon_step()
        version, stall_ms = self.versions.serve_again(target, self.counters)
        self._open_round()  # Note [Rounds]: the next round trains at the new id
        logger.info("rollback to %s: now serving %s (stall %.1f ms)", to, version.name, stall_ms)
        return {"weight_version": version.name, "parent": target.name, "stall_ms": stall_ms}

    def checkpoint(self, *, is_blocking: bool = False) -> None:
        """Saves the loop's state (a copy, taken now) through the background writer;
        ``is_blocking`` waits until it is on disk (shutdown). The open round's samples are not
        in the saved adapter yet: they are saved as pending."""
        in_round = list(self.current_round.taken) if self.current_round is not None else []
        self.versions.checkpoint(counters=self.counters, fates=self.fates, tally=self.tally,
                                 queue=self.queue, in_flight=in_round + self._inflight,
                                 is_blocking=is_blocking)

    def restore(self) -> bool:
        """The newest compatible checkpoint, if any (lifecycle.py); False when there was none."""
        return self.versions.restore(counters=self.counters, fates=self.fates, tally=self.tally,
                                     queue=self.queue)

    # ------------------------------------------------------------------ rounds
    def _is_close_due(self) -> bool:
        r, tc = self.current_round, self.config.train
        return r is not None and should_close_round(len(r.taken), self.clock() - r.opened_at,
                                                    self.round_s, tc.round_max_samples)

    def _open_round(self) -> OpenRound:
        """Note [Rounds]: a round at the serving version; the trainer's weights are its weights."""
        self.trainer.version = self.counters.train_state
        run = self.trainer.begin_round(is_replay_enabled=self.is_replay_enabled)
        self.current_round = OpenRound(self.registry.serving.name, self.clock(), run,
                                self.is_replay_enabled)
        return self.current_round

    def _next_work(self) -> Work | None:
        """The close of a due round, else the next sample by lane, else None."""
        if self.current_round is None:
            self._open_round()
        if self._is_close_due():
            return self._close_round()
        taken = self.queue.take_next(self.lag_of, self.config.train.max_version_lag)
        if taken is None:
            return None
        return self._train_sample(*taken)

    def _train_sample(self, p: PendingSample, lane: str) -> Work:
        r = self.current_round
        assert r is not None, "a sample is trained inside an open round"
        self._inflight = [p]
        self.state = "training"
        lag = self.lag_of(p)
        covered = (self.recordings.covered_tokens(p.handle)
                   if p.handle is not None and self.recordings is not None else 0)
        t0 = time.perf_counter()
        try:
            units = r.run.add(self._to_sample(p, lane, r.is_replay_enabled))
        except ValueError as exc:  # a malformed sample: drop it, counted, and go on
            logger.error("training sample dropped: %s", exc)
            self._drop([p])
            self._inflight = []
            return
        finally:  # the read-out and any graph rebuild are the trainer's work, as its units are
            self.counters.busy_ms += (time.perf_counter() - t0) * 1000.0
        while not units.is_done:
            units.run_unit()
            yield "train"
        has_recording = p.handle is not None
        self._release([p])
        self._inflight = []
        r.taken.append(p)
        r.tally.append(TakenSample(lane, lag, len(p.prompt_ids), covered, has_recording,
                                   p.enqueued_at))

    def _close_round(self) -> Work:
        """The optimizer unit, then gate, publish and (by time) a checkpoint; a new round opens."""
        tc, c, r = self.config.train, self.counters, self.current_round
        assert r is not None and r.taken, "a round never closes empty"
        self.state = "training"
        c.attempts += 1
        if c.attempts in self.inject_nonfinite_steps:
            r.run.inject_nonfinite()
        stats = r.run.close()
        yield "train"
        c.busy_ms += stats.step_ms
        self.current_round = None
        feedback = [p.feedback_id for p in r.taken if p.feedback_id is not None]
        if stats.is_nonfinite_skipped:  # counted by the trainer (train/stats.py)
            logger.warning("round skipped: non-finite loss or gradients (%d samples dropped, "
                           "nothing published)", len(r.taken))
            self._drop(r.taken)
            self._open_round()
            self.state = "idle"
            return
        steps = self.trainer.counters.steps  # this step counted by the trainer (train/stats.py)
        c.train_state += 1
        self.fates.trained += len(r.taken)
        if feedback and self.feedback is not None:
            self.feedback.on_trained(feedback, steps)
        c.steps_since_publish += 1
        c.last_step_ms, c.last_loss = stats.step_ms, stats.loss
        c.last_step_tokens, c.last_grad_norm = stats.tokens, r.run.grad_norm
        logger.info("round %d at %s: loss %.4f samples %d (fresh %d, stale %d) tokens %d replayed %d "
                    "recomputed %d units %d busy ms %.0f", steps, r.version, stats.loss,
                    stats.samples, r.fresh, r.stale, stats.tokens, stats.replayed_tokens,
                    stats.recomputed_tokens, stats.units, stats.step_ms)
        self.tally.add_round(r.tally)  # with the step's counters: a status read never splits them
        if (yield from self._publish()):
            self.tally.add_publish_delays(r.tally, self.clock())
        self._open_round()
        if should_checkpoint(self.clock() - c.last_checkpoint_at, tc.checkpoint_every_s):
            self.checkpoint()
            yield "checkpoint"
        self.state = "idle"

    def _drop(self, samples: list[PendingSample]) -> None:
        """Samples that end without training (Note [Sample fates]); their feedback rows are
        marked trained at step -1 so they are never taken again."""
        self._release(samples)
        self.fates.dropped += len(samples)
        ids = [p.feedback_id for p in samples if p.feedback_id is not None]
        if ids and self.feedback is not None:
            self.feedback.on_trained(ids, -1)

    def _age_out_stale(self) -> None:
        """At publish: pins beyond the lag bound are released, and stale samples pending longer
        than ``train.stale_max_age_s`` leave the queue (deferred or dropped, Note [Rounds])."""
        tc, now = self.config.train, self.clock()
        bound, max_age = tc.max_version_lag, tc.stale_max_age_s
        # A lag of None (a branch, never served) is beyond every bound.
        lags = {id(p): _STALE if (lag := self.lag_of(p)) is None else lag for p in self.queue}
        self._release([p for p in self.queue if lags[id(p)] > bound])
        old = self.queue.remove_where(lambda p: now - p.enqueued_at > max_age and lags[id(p)] > 0)
        self._release(old)
        deferred = [p.feedback_id for p in old if p.feedback_id is not None]
        if deferred and self.feedback is not None:
            self.feedback.on_deferred(deferred)
        else:
            deferred = []
        self.fates.deferred += len(deferred)
        self.fates.dropped += len(old) - len(deferred)
        if old:
            logger.info("stale backlog: %d feedback samples deferred, %d samples dropped (pending "
                        "> train.stale_max_age_s %.0f s)", len(deferred), len(old) - len(deferred),
                        max_age)

    def _to_sample(self, p: PendingSample, lane: str = "fresh", is_replay: bool = True) -> Sample:
        """A trainer ``Sample``; its recording's segments, labelled by lag (Note [Lag ...]), are
        read only when they will be replayed (never for the stale lane or with replay off)."""
        segments: Sequence[RecordedSegment] = ()
        version = self.counters.train_state
        if p.handle is not None and self.recordings is not None and is_replay and lane != "stale":
            lag = self.lag_of(p)  # one walk of the lineage
            version -= _STALE if lag is None else lag
            segments = self.recordings.segments(p.handle)
        return build_sample(p, segments, version, self.trainer)  # Note [Graph samples]

    def _release(self, pending: list[PendingSample]) -> None:
        for p in pending:
            if p.handle is not None and self.recordings is not None:
                self.recordings.unpin(p.handle)
                p.handle = None

    # ------------------------------------------------------------------ publish
    def _publish(self) -> Generator[str, None, bool]:
        c, gc = self.counters, self.config.publish.gate
        self.state = "publishing"
        t0 = time.perf_counter()
        frozen = self.trainer.adapter.snapshot()
        metric = None
        if gc.is_enabled and self.gate_pairs and (c.publishes + c.rejected) % gc.every == 0:
            self.state = "gating"
            decision = yield from gate_units(self.trainer, self.registry, self.gate_pairs, gc)
            metric = decision.metric
            if not decision.is_accepted:
                self._reject(decision, metric)
                return False
        self.state = "publishing"
        self.publisher.begin(frozen)
        while not self.publisher.is_built:
            self.publisher.run_unit()
            yield "publish.build"
        while not self.host.can_publish():
            yield WAIT
        stall_ms = self.publisher.commit()
        self.trainer.set_published(frozen)
        steps = self.trainer.counters.steps
        version = self.registry.mint(step=steps, parent=self.registry.serving.name, metric=metric)
        self.host.announce(version.name)
        c.steps_since_publish = 0
        if self.recordings is not None:  # store Note [Store lifetime]: the others never replay again
            lag_max = self.config.train.max_version_lag
            self.recordings.release_versions(
                lambda v: (lag := self.registry.lag(v, version.name)) is not None and lag <= lag_max)
        self._age_out_stale()
        yield "publish.commit"
        self.versions.save_adapter(version.name)
        c.publishes += 1
        c.last_publish_at = self.clock()
        publish_ms = (time.perf_counter() - t0) * 1000.0
        c.last_publish_ms, c.last_stall_ms = publish_ms, stall_ms
        c.recent_publishes = (c.recent_publishes + [
            {"version": version.name, "publish_ms": publish_ms, "stall_ms": stall_ms,
             "radix_hit_rate_before": c.close_radix_window()}])[-64:]
        logger.info("publish %s (step %d, parent %s): build+copy %.0f ms, stall %.1f ms",
                    version.name, steps, version.parent, publish_ms, stall_ms)
        if gc.is_enabled:
            self.versions.accepted = self.versions.snapshot()
        yield "publish.save"
        return True

    def _reject(self, decision: GateDecision, metric: float) -> None:
        c = self.counters
        rejected = self.registry.mint(step=self.trainer.counters.steps,
                                      parent=self.registry.serving.name, metric=metric,
                                      is_rejected=True)
        self.versions.back_to_accepted()
        c.rejected += 1
        c.train_state += 1  # the rejected steps' recordings are never replayed exactly again
        c.steps_since_publish = 0
        c.last_publish_at = self.clock()
        logger.warning("gate rejected %s: %s; trainer back at %s", rejected.name, decision.reason,
                       self.registry.serving.name)

    def status(self) -> dict[str, dict[str, Any]]:
        """The ``train`` and ``publish`` blocks of ``/alchemist/status`` (loop_status.py)."""
        return loop_status(self)
