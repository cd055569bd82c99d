"""What outlives a step of the online loop: saved versions, rollback, checkpoints and restore.

Owns ``VersionKeeper``, held by ``OnlineLoop`` (loop.py): each served version's adapter and AdamW
state on disk (written off the scheduler thread, disk_writer.py), the retention of those folders, the
weights of a rollback target served under a new id, checkpoints and the restore at startup, and
the gate's "last accepted" trainer state (``accepted``), its one piece of state. The loop hands it
the round-level values it needs (counters, queue, fates, tally) per call. Same contract as the
loop: scheduler thread only, between iterations. Imports package modules only; never sglang.
"""

from __future__ import annotations

import copy
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from alchemist_sgl.config import Config
from alchemist_sgl.log import get_logger
from alchemist_sgl.online import adapters
from alchemist_sgl.online.accounting import RoundTally, SampleFates
from alchemist_sgl.online.checkpoint import CheckpointMeta, CheckpointStore
from alchemist_sgl.online.intake import PendingSample, SampleQueue
from alchemist_sgl.online.loop_types import LoopCounters, ServingHost
from alchemist_sgl.online.publish import Publisher
from alchemist_sgl.online.versions import VersionInfo, VersionRegistry
from alchemist_sgl.online.disk_writer import BackgroundWriter
from alchemist_sgl.train.trainer import ReplayTrainer

logger = get_logger(__name__)


@dataclass(frozen=True)
class TrainerSnapshot:
    """Copies of the adapter (PEFT names) and the AdamW state: the gate's "last accepted" point."""

    peft: dict[str, torch.Tensor]
    optimizer: dict[str, object]


class VersionKeeper:
    """Saves, retains, restores and rolls back versions of the trainer and the served weights."""

    def __init__(self, *, config: Config, trainer: ReplayTrainer, registry: VersionRegistry,
                 publisher: Publisher, host: ServingHost, writer: BackgroundWriter,
                 checkpoints: CheckpointStore, meta: CheckpointMeta,
                 clock: Callable[[], float]) -> None:
        self.config, self.trainer, self.registry = config, trainer, registry
        self.publisher, self.host, self.writer = publisher, host, writer
        self.checkpoints, self.meta, self.clock = checkpoints, meta, clock
        self.accepted = self.snapshot()  # the gate's last accepted trainer state

    def mint_serving(self, *, step: int, parent: str, metric: float | None) -> VersionInfo:
        version = self.registry.mint(step=step, parent=parent, metric=metric)
        self.host.announce(version.name)
        self.save_adapter(version.name)
        return version

    def save_adapter(self, name: str) -> None:
        """The version's adapter (PEFT folder) and AdamW state, for rollback, written by the
        background writer from copies; its path is recorded, and retention applied, once it has
        landed (Note [Writes off the serving path])."""
        folder = Path(self.config.train.checkpoint_dir) / "adapters" / name
        peft = {k: v.clone() for k, v in self.trainer.adapter.peft_state_dict().items()}
        optimizer = copy.deepcopy(self.trainer.optimizer.state_dict())
        config = self.trainer.adapter.peft_config_dict()

        def write() -> None:
            adapters.save_adapter(folder, peft, config, optimizer, self.meta.model)

        def landed(_: object) -> None:
            self.registry.set_adapter_path(name, str(folder))
            self._prune_adapters()

        self.writer.submit(write, landed)

    def _prune_adapters(self) -> None:
        pc = self.config.publish
        ids = [v.id for v in self.registry.page(10**9, 0) if v.adapter_path]
        protected = {self.registry.serving.id}
        for vid in adapters.prune_plan(ids, pc.keep_adapters_last, pc.keep_adapters_every,
                                       protected):
            name = f"v{vid}"
            path = self.registry.get(name).adapter_path
            if path:
                self.registry.set_adapter_path(name, None)  # no rollback to it from now on
                self.writer.submit(functools.partial(shutil.rmtree, path, ignore_errors=True))

    # ------------------------------------------------------------------ rollback
    def rollback_target(self, to: str) -> VersionInfo:
        """The version a rollback may serve again. Raises KeyError (unknown), ValueError (rejected
        by the gate) or RuntimeError (a chunked prefill is in flight: retry later)."""
        self.writer.flush()  # the target's adapter folder may still be landing
        target = self.registry.get(to)
        if target.state == "rejected":
            raise ValueError(f"{to} was rejected by the gate and was never served")
        if not self.host.can_publish():
            raise RuntimeError("a chunked prefill is in flight; retry in a moment")
        return target

    def serve_again(self, target: VersionInfo, counters: LoopCounters) -> tuple[VersionInfo, float]:
        """Loads ``target``'s adapter and AdamW state (LookupError: no longer kept), publishes
        them in one go and serves them under a new id. Returns (the new version, stall ms). The
        loop has abandoned its round first."""
        if target.name == "v0" and not target.adapter_path:
            self.trainer.reset_to_fresh()
        else:
            if not target.adapter_path:
                raise LookupError(f"the adapter of {target.name} is no longer kept "
                                  "(publish.keep_adapters_*)")
            peft_state, optimizer_state = adapters.load_adapter(Path(target.adapter_path))
            self.trainer.load_adapter_state(peft_state, optimizer_state)
        frozen = self.trainer.adapter.snapshot()
        self.publisher.build_all(frozen)
        stall_ms = self.publisher.commit()
        self.trainer.set_published(frozen)
        counters.train_state += 1
        counters.steps_since_publish = 0
        version = self.mint_serving(step=target.step, parent=target.name, metric=target.metric)
        self.accepted = self.snapshot()
        return version, stall_ms

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, *, counters: LoopCounters, fates: SampleFates, tally: RoundTally,
                   queue: SampleQueue, in_flight: list[PendingSample],
                   is_blocking: bool = False) -> None:
        """Saves the loop's state (a copy, taken now) through the background writer; the samples
        ``in_flight`` (the open round's, the one under way) are saved as pending, ahead of the
        queue's. ``is_blocking`` waits until it is on disk (shutdown)."""
        pending = [without_handle(p) for p in in_flight]
        state = copy.deepcopy({"trainer": self.trainer.state_dict(), "versions": self.registry.state(),
                               "pending": [p.as_state() for p in pending] + queue.state(),
                               "rng": torch.get_rng_state(), "counters": vars(counters),
                               "fates": vars(fates), "tally": vars(tally)})
        step, serving = self.trainer.counters.steps, self.registry.serving.name
        counters.last_checkpoint_at = self.clock()

        def write() -> None:
            self.checkpoints.save(step, state, self.meta)
            logger.info("checkpoint at step %d (%s serving)", step, serving)

        self.writer.submit(write)
        if is_blocking:
            self.writer.flush()

    def restore(self, *, counters: LoopCounters, fates: SampleFates, tally: RoundTally,
                queue: SampleQueue) -> bool:
        """Loads the newest compatible checkpoint and rebuilds the served weights from the master
        plus the serving version's adapter. Returns False when there was none."""
        state = self.checkpoints.load_latest(self.meta)
        if state is None:
            if self.registry.serving.name != "v0":
                # The registry outlived its checkpoints: the live weights are W0 again, which
                # gets a fresh id (ids are never reused, Note [Rebuild from the master]).
                self.mint_serving(step=0, parent="v0", metric=self.registry.v0_metric())
            else:
                self.host.announce("v0")
            return False
        self.trainer.load_state_dict(state["trainer"])
        self.registry.restore(state["versions"])
        queue.load_state(state["pending"])
        torch.set_rng_state(state["rng"])
        for key, value in state["counters"].items():
            if hasattr(counters, key):  # keys of older checkpoints (steps: the trainer's) skipped
                setattr(counters, key, value)
        for key, value in state.get("fates", {}).items():
            setattr(fates, key, value)
        for key, value in state.get("tally", {}).items():
            setattr(tally, key, value)
        counters.last_publish_at = counters.last_checkpoint_at = self.clock()
        if self.trainer.published is not None:
            self.publisher.build_all(self.trainer.published)
            self.publisher.commit()
        self.host.announce(self.registry.serving.name)
        self.accepted = self.snapshot()
        logger.info("restored checkpoint at step %d: serving %s, %d samples pending",
                    self.trainer.counters.steps, self.registry.serving.name, len(queue))
        return True

    # ------------------------------------------------------------------ the gate's accepted point
    def snapshot(self) -> TrainerSnapshot | None:
        """Copies of the adapter and AdamW state (None with the gate off: never needed)."""
        if not self.config.publish.gate.is_enabled:
            return None
        return TrainerSnapshot(
            {k: v.clone() for k, v in self.trainer.adapter.peft_state_dict().items()},
            copy.deepcopy(self.trainer.optimizer.state_dict()))

    def back_to_accepted(self) -> None:
        """Back to the last accepted adapter and AdamW state; cumulative counters stay."""
        if self.accepted is not None:
            self.trainer.load_adapter_state(self.accepted.peft,
                                            copy.deepcopy(self.accepted.optimizer))


def without_handle(p: PendingSample) -> PendingSample:
    q = copy.copy(p)
    q.handle = None
    return q
