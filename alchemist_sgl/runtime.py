"""The composition root, living in SGLang's scheduler process: ``build_runtime`` builds every part.

Owns ``build_runtime`` (completion log, recording's status and commands, the online loop with its
trainer, publisher, versions, checkpoints and sample admission, the feedback poller, the memory
arbiter, every status section and control command) and ``Runtime``, which holds the parts it was
built with (typed fields, none assigned later) and answers the scheduler's events. SGLang's side
arrives as plain values and views built in ``integration/`` (``SchedulerInfo``, ``ServedModel``,
an installed ``Recording``); this module never imports sglang.

Contract: every method is called on the scheduler's own thread, between scheduler steps, so no
locking is needed; a method that fails must not raise into SGLang (the plugin catches, disables the
feature and logs, see Note [fail loudly, keep serving] in integration/plugin.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from alchemist_sgl import __version__
from alchemist_sgl.api.control import ControlQueue
from alchemist_sgl.config import Config
from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.ratings import FeedbackStore
from alchemist_sgl.log import get_logger
from alchemist_sgl.memory.arbiter import MemoryArbiter, ServingPressure, TtftWindow
from alchemist_sgl.memory.status import KvPoolView, memory_status
from alchemist_sgl.online import commands
from alchemist_sgl.online.accounting import SampleFates
from alchemist_sgl.online.admission import SampleAdmission
from alchemist_sgl.online.checkpoint import CheckpointMeta, CheckpointStore
from alchemist_sgl.online.feedback_guard import FeedbackGuard, attach_guard
from alchemist_sgl.online.feedback_poll import FeedbackPoller
from alchemist_sgl.online.gate import load_heldout
from alchemist_sgl.online.intake import SampleQueue
from alchemist_sgl.online.loop import OnlineLoop
from alchemist_sgl.online.loop_status import publish_status, train_status
from alchemist_sgl.online.loop_types import RecordingSource, ServingHost
from alchemist_sgl.online.publish import MasterWeights, Publisher
from alchemist_sgl.online.versions import VersionRegistry
from alchemist_sgl.record.capture import Capture
from alchemist_sgl.record.export import debug_handlers
from alchemist_sgl.core.plan_auto import PlanChoice
from alchemist_sgl.store.activation_store import ActivationStore
from alchemist_sgl.store.recordings import StoreRecordings
from alchemist_sgl.train.offload import SavedTensorOffload
from alchemist_sgl.train.residency import ResidencyAccount
from alchemist_sgl.train.samples import Sample
from alchemist_sgl.train.spec import PROJECTIONS
from alchemist_sgl.train.trainer import ReplayTrainer
from alchemist_sgl.train.warmup import warm_up_compiled
from alchemist_sgl.train.weights import BaseWeights

logger = get_logger(__name__)

StatusSection = Callable[[], object]  # a block of /alchemist/status
Command = Callable[[dict[str, Any]], object]  # a control command: payload -> JSON answer


@dataclass(frozen=True)
class SchedulerInfo:
    """Facts about the scheduler process the runtime lives in."""

    pid: int
    device: str  # "cpu" | "cuda:N"
    model_name: str  # the served model name (OpenAI `model`)
    model_path: str


@dataclass
class RuntimeState:
    """What the runtime and the scheduler hooks share: built first, before any part, because the
    views of ``integration/`` read and write it (the version stamp, the arbiter's inputs)."""

    iterations: int = 0
    weight_version: str = "v0"
    started_at: float = field(default_factory=time.time)
    disabled_features: dict[str, str] = field(default_factory=dict)  # feature -> reason
    arrivals: int = 0  # requests received since the last iteration (the arbiter's input)
    ttft: TtftWindow = field(default_factory=TtftWindow)  # first tokens seen by the scheduler

    def disable(self, feature: str, reason: str) -> None:
        """Turns a feature off for the life of the process, loudly; serving goes on."""
        if feature not in self.disabled_features:
            logger.error("disabling %s: %s (serving continues)", feature, reason)
        self.disabled_features[feature] = reason

    def is_disabled(self, feature: str) -> bool:
        return feature in self.disabled_features


class Recording(Protocol):
    """Recording as installed on the served model (integration/capture_hooks.py)."""

    @property
    def capture(self) -> Capture: ...
    @property
    def store(self) -> ActivationStore: ...
    @property
    def choice(self) -> PlanChoice: ...


@dataclass(frozen=True)
class ServedModel:
    """What training needs of the served model, as plain values and views of SGLang's objects
    (built by integration/training.py ``served_model``)."""

    weights: BaseWeights  # the served model's own parameter storage (trained over, published into)
    parameters: tuple[torch.Tensor, ...]  # every served parameter (the memory block)
    host: ServingHost
    tokenize: Callable[[str], list[int]]
    chat: Callable[[list[dict[str, str]]], list[int]]
    eos_id: int | None
    max_tokens: int
    pressure: Callable[[], ServingPressure]  # the arbiter's input, once per iteration
    kv_pool: Callable[[], KvPoolView]
    storage: Callable[[], dict[str, object]]  # debug.storage: shared with the served model?
    inject_nonfinite_steps: frozenset[int] = frozenset()  # tests only


def build_runtime(config: Config, info: SchedulerInfo, state: RuntimeState, *,
                  control: ControlQueue | None, recording: Recording | None,
                  served: ServedModel | None) -> Runtime:
    """Every part of the scheduler process, then the runtime that holds them. ``served`` is None
    while training is off; a part that fails to build disables its feature, serving goes on."""
    completions = SqliteCompletionLog(config.feedback.db_path, ttl_s=config.feedback.completion_ttl_s)
    sections: dict[str, StatusSection] = {}
    handlers: dict[str, Command] = {}
    is_debug = config.server.enable_debug_commands
    var_dir = Path(config.server.cache_dir).parent
    if recording is not None:
        sections.update(record_plan=recording.choice.as_status, store=recording.store.status,
                        record=recording.capture.status)
        if is_debug:
            handlers.update(debug_handlers(recording.store, lambda: str(state.weight_version),
                                           var_dir / "debug"))
    training, arbiter, pressure = None, None, None
    if served is not None:
        try:
            training = build_loop(
                config=config, weights=served.weights, host=served.host,
                recordings=StoreRecordings(recording.store) if recording is not None else None,
                completions=completions, model_name=info.model_path, tokenize=served.tokenize,
                chat=served.chat, eos_id=served.eos_id, max_tokens=served.max_tokens,
                serving=lambda: state.weight_version,
                feedback=FeedbackStore(config.feedback.db_path),
                recorded=recording.choice.plan.projections if recording is not None else PROJECTIONS,
                inject_nonfinite_steps=served.inject_nonfinite_steps)
        except Exception as exc:
            logger.exception("building the online loop failed")
            state.disable("train", f"install failed: {exc!r}")
    if training is not None and served is not None:
        loop = training.loop
        ratings = training.guard.ratings if training.guard is not None else dict
        handlers.update(commands.handlers(loop, training.admission, var_dir=var_dir,
                                          is_debug=is_debug, ratings=ratings))
        sections.update(train=lambda: train_status(loop), publish=lambda: publish_status(loop),
                        versions=lambda: loop.registry.status(cap=20, ratings=ratings()))
        if config.memory.is_enabled:
            arbiter = MemoryArbiter(config.memory, busy_slice_ms=config.train.slice_budget_ms,
                                    idle_slice_ms=config.train.idle_slice_ms, clock=time.monotonic)
            pressure = served.pressure
            sections["arbiter"] = arbiter.status
        sections["memory"] = lambda: memory_status(
            device=served.weights.device, served=served.parameters, master=loop.master,
            trainer=loop.trainer, kv=served.kv_pool())
        if is_debug:
            handlers["debug.storage"] = lambda payload: served.storage()
    return Runtime(config, info, state=state, control=control, completions=completions,
                   training=training, arbiter=arbiter, pressure=pressure,
                   status_sections=sections, commands=handlers)


@dataclass(frozen=True)
class Training:
    """The online loop and what feeds it: admission (admin samples), feedback poller and guard."""

    loop: OnlineLoop
    admission: SampleAdmission
    feedback: FeedbackPoller | None
    guard: FeedbackGuard | None = None


def build_loop(*, config: Config, weights: BaseWeights, host: ServingHost,
               recordings: RecordingSource | None, completions: SqliteCompletionLog | None,
               model_name: str, tokenize: Callable[[str], list[int]],
               chat: Callable[[list[dict[str, str]]], list[int]], eos_id: int | None,
               max_tokens: int, serving: Callable[[], str], feedback: FeedbackStore | None = None,
               recorded: Sequence[str] = PROJECTIONS,
               inject_nonfinite_steps: frozenset[int] = frozenset(),
               clock: Callable[[], float] = time.monotonic) -> Training:
    """The online loop over the live ``weights``: trainer, master copy of W0, publisher, sample
    queue, version registry and checkpoints under ``train.checkpoint_dir``, the gate's held-out
    pairs, the sample admission and (with ``feedback``) the feedback poller; then restores the
    newest compatible checkpoint (or announces v0) and, with ``train.compile``, compiles the
    trainer's layers before serving starts."""
    tc = config.train
    folder = Path(tc.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # memory.offload: the work units move their saved tensors (train/offload.py); None: no hooks.
    residency = SavedTensorOffload(ResidencyAccount(weights.device)) if config.memory.offload else None
    trainer = ReplayTrainer(weights, tc, seed=tc.seed, residency=residency)
    master = MasterWeights(weights, tuple(tc.lora.targets))
    meta = CheckpointMeta(model=str(model_name), rank=tc.lora.rank, alpha=float(tc.lora.alpha),
                          targets=tuple(tc.lora.targets), dtype=str(weights.dtype).replace("torch.", ""))
    gate_pairs: list[Sample] = []
    if config.publish.gate.is_enabled:
        for prompt, response in load_heldout(config.publish.gate.heldout_path):
            ids = chat([{"role": "user", "content": prompt}])
            out = tokenize(response) + ([eos_id] if eos_id is not None else [])
            gate_pairs.append(Sample(ids, out))
    admission = SampleAdmission(
        tokenize=tokenize, chat=chat, eos_id=eos_id, completions=completions,
        pin=recordings.pin if recordings is not None else None,
        unpin=recordings.unpin if recordings is not None else (lambda handle: None),
        serving=serving, max_tokens=max_tokens, clock=clock)
    queue, fates = SampleQueue(tc.max_pending_samples, clock), SampleFates()
    poller = None if feedback is None or completions is None else FeedbackPoller(
        store=feedback, completions=completions, admission=admission, queue=queue,
        tokenize=tokenize, eos_id=eos_id, fates=fates, every_s=config.feedback.poll_every_s,
        clock=clock)
    loop = OnlineLoop(config=config, trainer=trainer, queue=queue, fates=fates,
                      registry=VersionRegistry(folder / "versions.json"),
                      checkpoints=CheckpointStore(folder), checkpoint_meta=meta,
                      publisher=Publisher(master, weights), master=master, host=host,
                      recordings=recordings, feedback=poller, gate_pairs=gate_pairs,
                      inject_nonfinite_steps=inject_nonfinite_steps, clock=clock)
    loop.restore()
    _compile_before_serving(trainer, recorded)
    guard = attach_guard(poller, config.publish.guard, loop) if poller is not None else None
    if poller is not None and (requeued := poller.after_restore(trainer.counters.steps)):
        logger.info("%d feedback rows trained after the restored step (or only queued) go back "
                    "to pending", requeued)
    return Training(loop, admission, poller, guard)


def _compile_before_serving(trainer: ReplayTrainer, recorded: Sequence[str]) -> None:
    """train.compile: compile the loop's layer graphs now, before the server reports ready
    (train/warmup.py), for samples carrying the ``recorded`` projections (the plan's; all four
    while recording is off); a failure is logged and training runs eager instead."""
    if not trainer.is_compiled:
        return
    try:
        trainer.compile_info = warm_up_compiled(trainer, tuple(recorded))
        logger.info("train.compile: layer graphs compiled in %.1f s (%d warm-up steps)",
                    trainer.compile_info["compile_s"], trainer.compile_info["steps"])
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train eager, loudly
        trainer.is_compiled = False
        trainer.compile_info = {"compile_s": 0.0, "steps": 0, "error": f"{type(exc).__name__}: {exc}"}
        logger.error("train.compile failed, training runs eager: %s", trainer.compile_info["error"])


class Runtime:
    """Holds the per-process parts and answers status; one per scheduler process."""

    def __init__(self, config: Config, info: SchedulerInfo, *, state: RuntimeState | None = None,
                 control: ControlQueue | None = None,
                 completions: SqliteCompletionLog | None = None, training: Training | None = None,
                 arbiter: MemoryArbiter | None = None,
                 pressure: Callable[[], ServingPressure] | None = None,
                 status_sections: Mapping[str, StatusSection] | None = None,
                 commands: Mapping[str, Command] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.info, self.control, self.clock = config, info, control, clock
        self.state = state if state is not None else RuntimeState()
        self.completions = completions  # shared with the HTTP process through SQLite
        # The online loop, its admission and feedback poller; None: training off or failed.
        self.training = training
        self.loop = training.loop if training is not None else None
        self.arbiter, self.pressure = arbiter, pressure  # None while the arbiter is off
        # Extra status sections, each produced by a part: name -> callable returning its block.
        self._status_sections: dict[str, StatusSection] = dict(status_sections or {})
        # Control commands: kind -> handler(payload) -> JSON value (api/control.py).
        self._commands: dict[str, Command] = dict(commands or {})
        self._last_purge = clock()
        if config.server.enable_debug_commands:
            self.register_command("debug.ping", lambda payload: {"pid": self.info.pid, "echo": payload})
        logger.info("alchemist runtime up in scheduler pid %d on %s serving '%s'",
                    info.pid, info.device, info.model_name)

    def add_status_section(self, name: str, producer: StatusSection) -> None:
        self._status_sections[name] = producer

    def register_command(self, kind: str, handler: Command) -> None:
        self._commands[kind] = handler

    def process_commands(self) -> int:
        """Runs every pending control command; returns how many ran. A failing handler answers
        with its error; it never raises into SGLang."""
        if self.control is None:
            return 0
        ran = 0
        for command in self.control.pending():
            handler = self._commands.get(command.kind)
            if handler is None:
                self.control.complete(command.id, False,
                                      {"error": f"unknown command '{command.kind}'", "is_unknown": True})
                continue
            try:
                self.control.complete(command.id, True, handler(command.payload))
            except Exception as exc:
                self.control.complete(command.id, False, _error_answer(command.kind, exc))
            ran += 1
        return ran

    def on_iteration(self) -> None:
        """Called once per scheduler loop iteration."""
        self.state.iterations += 1

    # ------------------------------------------------------------------ training slot
    def on_train_slot(self, is_busy: bool) -> None:
        """One slice of work units after a batch or an idle pass (quiescent points)."""
        loop = self.loop
        if loop is None or self.is_disabled("train"):
            return
        loop.writer.drain()  # finished disk writes report back even while paused
        if self.clock() - self._last_purge > 60.0 and self.completions is not None:
            self._last_purge = self.clock()
            self.completions.purge_expired()  # expired completions leave tombstones (410)
        tc = self.config.train
        budget_ms = tc.slice_budget_ms if is_busy else tc.idle_slice_ms
        if self.arbiter is not None and self.pressure is not None:
            was = self.arbiter.state
            decision = self.arbiter.decide(self.pressure())  # once per scheduler iteration
            self.state.arrivals = 0
            budget_ms = decision.slice_ms  # 0 on a spike: no unit starts (publishes wait too)
            if was == "TRAINING" and decision.state != "TRAINING":
                loop.yield_memory()  # train/offload.py, Note [Yield moves memory]
        if loop.is_paused:
            return
        feedback = self.training.feedback if self.training is not None else None
        if feedback is not None:
            feedback.poll()
        if budget_ms > 0:
            loop.run_slice(budget_ms)

    def has_training_work(self) -> bool:
        """True when the loop has work and the arbiter lets it run (then SGLang's idle sleep is
        skipped; a yielded trainer lets the scheduler sleep)."""
        if self.loop is None or self.is_disabled("train") or not self.loop.has_work:
            return False
        return self.arbiter is None or self.arbiter.state == "TRAINING"

    def note_finished_request(self, cached_tokens: int, prompt_tokens: int) -> None:
        """A finished request's radix hits (online/loop_types.py, Note [Radix hit rate])."""
        if self.loop is not None:
            self.loop.note_finished_request(cached_tokens, prompt_tokens)

    def on_shutdown(self) -> None:
        """Checkpoint at shutdown (SGLang kills the scheduler 15 s after asking it to exit)."""
        if self.loop is not None and not self.is_disabled("train"):
            self.loop.abandon_step()
            self.loop.checkpoint(is_blocking=True)

    def disable(self, feature: str, reason: str) -> None:
        """Turns a feature off for the life of the process, loudly; serving goes on."""
        self.state.disable(feature, reason)

    def is_disabled(self, feature: str) -> bool:
        return self.state.is_disabled(feature)

    def status(self) -> dict[str, Any]:
        """The ``GET /alchemist/status`` payload (docs/api.md)."""
        out: dict[str, Any] = {
            "version": __version__,
            "model": self.info.model_name,
            "device": self.info.device,
            "scheduler_pid": self.info.pid,
            "iterations": self.state.iterations,
            "weight_version": self.state.weight_version,
            "disabled": dict(self.state.disabled_features),
        }
        for name, producer in self._status_sections.items():
            try:
                out[name] = producer()
            except Exception as exc:  # a broken section must not break status
                logger.exception("status section %s failed", name)
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out


def _error_answer(kind: str, exc: Exception) -> dict[str, Any]:
    """A failed command's answer: a ``CommandError``'s status and field (online/commands.py),
    else the exception's type and message (logged with its traceback)."""
    if (status := getattr(exc, "http_status", None)) is None:
        logger.exception("control command %s failed", kind)
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    answer: dict[str, Any] = {"error": message if status else f"{type(exc).__name__}: {exc}"}
    if status is not None:
        answer["http_status"] = int(status)
    if field_name := getattr(exc, "field", None):
        answer["field"] = field_name
    return answer
