"""Composition root living in SGLang's scheduler process.

Owns the components that run beside serving (recording, store, trainer, arbiter as they arrive)
and the status they report. Built once per scheduler process by ``integration/plugin.py`` from
the resolved config and a read-only ``SchedulerInfo``; it never imports sglang: everything SGLang
gives it arrives as plain values or views built in ``integration/``.

Contract: every method is called on the scheduler's own thread, between scheduler steps, so no
locking is needed; a method that fails must not raise into SGLang (the plugin catches, disables the
feature and logs, see Note [fail loudly, keep serving] in integration/plugin.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from alchemist_sgl import __version__
from alchemist_sgl.config import Config
from alchemist_sgl.api.control import ControlQueue
from alchemist_sgl.log import get_logger
from alchemist_sgl.memory.arbiter import TtftWindow
from alchemist_sgl.feedback.completion_log import SqliteCompletionLog

logger = get_logger(__name__)


@dataclass(frozen=True)
class SchedulerInfo:
    """Facts about the scheduler process the runtime lives in."""

    pid: int
    device: str  # "cpu" | "cuda:N"
    model_name: str  # the served model name (OpenAI `model`)
    model_path: str


@dataclass
class RuntimeState:
    """State that outlives an iteration (checkpointed once training lands)."""

    iterations: int = 0
    weight_version: str = "v0"
    started_at: float = field(default_factory=time.time)
    disabled_features: dict[str, str] = field(default_factory=dict)  # feature -> reason


class Runtime:
    """Holds the per-process components and answers status; one per scheduler process."""

    def __init__(self, config: Config, info: SchedulerInfo, control: ControlQueue | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.info = info
        self.control = control
        self.clock = clock
        self.state = RuntimeState()
        # Extra status sections, each produced by a component: name -> callable returning a dict.
        self._status_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        # Control commands: kind -> handler(payload) -> JSON value (see alchemist_sgl/control.py).
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {}
        # The installed recording (store + plan + capture), set by the integration layer; None
        # while recording is off or failed to install. The trainer reads the store through it.
        self.recording: Any = None
        # The online loop and its sample admission (online/), set by integration/training.py;
        # None while training is off or failed to install.
        self.loop: Any = None
        self.admission: Any = None
        # Durable completion log (feedback/), shared with the HTTP process through SQLite.
        self.completions = SqliteCompletionLog(config.feedback.db_path,
                                               ttl_s=config.feedback.completion_ttl_s)
        self.feedback: Any = None  # the FeedbackPoller (online/feedback_poll.py) once training is up
        # The memory arbiter (memory.py) and the callable that reads serving pressure, both set by
        # integration/training.py; None while training is off.
        self.arbiter: Any = None
        self.pressure: Callable[[], Any] | None = None
        self.arrivals = 0  # requests received since the last iteration (the arbiter's input)
        # First tokens seen by the scheduler (integration/training.py): the arbiter's TTFT input.
        self.ttft = TtftWindow()
        self._last_purge = clock()
        if config.server.enable_debug_commands:
            self.register_command("debug.ping", lambda payload: {"pid": self.info.pid, "echo": payload})
        logger.info("alchemist runtime up in scheduler pid %d on %s serving '%s'",
                    info.pid, info.device, info.model_name)

    def add_status_section(self, name: str, producer: Callable[[], dict[str, Any]]) -> None:
        self._status_sections[name] = producer

    def register_command(self, kind: str, handler: Callable[[dict[str, Any]], Any]) -> None:
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
                status = getattr(exc, "http_status", None)
                if status is None:
                    logger.exception("control command %s failed", command.kind)
                message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
                answer: dict[str, Any] = {"error": message if status else f"{type(exc).__name__}: {exc}"}
                if status is not None:
                    answer["http_status"] = int(status)
                if getattr(exc, "field", None):
                    answer["field"] = exc.field
                self.control.complete(command.id, False, answer)
            ran += 1
        return ran

    def on_iteration(self) -> None:
        """Called once per scheduler loop iteration."""
        self.state.iterations += 1

    # ------------------------------------------------------------------ training slot
    def on_train_slot(self, is_busy: bool) -> None:
        """One slice of work units after a batch or an idle pass (quiescent points)."""
        if self.loop is None or self.is_disabled("train"):
            return
        self.loop.writer.drain()  # finished disk writes report back even while paused
        if self.clock() - self._last_purge > 60.0:
            self._last_purge = self.clock()
            self.completions.purge_expired()  # expired completions leave tombstones (410)
        tc = self.config.train
        budget_ms = tc.slice_budget_ms if is_busy else tc.idle_slice_ms
        if self.arbiter is not None and self.pressure is not None:
            was = self.arbiter.state
            decision = self.arbiter.decide(self.pressure())  # once per scheduler iteration
            self.arrivals = 0
            budget_ms = decision.slice_ms  # 0 on a spike: no unit starts (publishes wait too)
            if was == "TRAINING" and decision.state != "TRAINING":
                self.loop.yield_memory()  # train/offload.py, Note [Yield moves memory]
        if self.loop.is_paused:
            return
        if self.feedback is not None:
            self.feedback.poll()
        if budget_ms > 0:
            self.loop.run_slice(budget_ms)

    def has_training_work(self) -> bool:
        """True when the loop has work and the arbiter lets it run (then SGLang's idle sleep is
        skipped; a yielded trainer lets the scheduler sleep)."""
        if self.loop is None or self.is_disabled("train") or not self.loop.has_work:
            return False
        return self.arbiter is None or self.arbiter.state == "TRAINING"

    def on_shutdown(self) -> None:
        """Checkpoint at shutdown (SGLang kills the scheduler 15 s after asking it to exit)."""
        if self.loop is not None and not self.is_disabled("train"):
            self.loop.abandon_step()
            self.loop.checkpoint(is_blocking=True)

    def disable(self, feature: str, reason: str) -> None:
        """Turns a feature off for the life of the process, loudly; serving goes on."""
        if feature not in self.state.disabled_features:
            logger.error("disabling %s: %s (serving continues)", feature, reason)
        self.state.disabled_features[feature] = reason

    def is_disabled(self, feature: str) -> bool:
        return feature in self.state.disabled_features

    def status(self) -> dict[str, Any]:
        """The ``GET /alchemist/status`` payload (INTERFACES.md)."""
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
