"""The online loop's lifecycle: saving versions, rollback, checkpoints and restore.

Owns ``LoopLifecycle``, the half of ``OnlineLoop`` (loop.py) that outlives a step: each served
version's adapter and AdamW state on disk (written off the scheduler thread, writer.py), the
retention of those folders, rollback to a kept version under a new id, checkpoints and the restore
at startup. A mixin over the loop's own attributes (``trainer``, ``registry``, ``publisher``,
``host``, ``writer``, ``counters``, ...), split out to keep each file readable; it has no state of
its own. Same contract as the loop: scheduler thread only, between iterations.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch

from alchemist_sgl.log import get_logger

logger = get_logger(__name__)


class LoopLifecycle:
    def _mint_serving(self, *, step: int, parent: str, metric: float | None) -> Any:
        version = self.registry.mint(step=step, parent=parent, metric=metric)
        self.host.announce(version.name)
        self._save_adapter(version.name)
        return version

    def _save_adapter(self, name: str) -> None:
        """The version's adapter (PEFT folder) and AdamW state, for rollback, written by the
        background writer from copies; its path is recorded, and retention applied, once it has
        landed (Note [Writes off the serving path])."""
        folder = self._adapter_folder(name)
        peft = {k: v.clone() for k, v in self.trainer.adapter.peft_state_dict().items()}
        optimizer = copy.deepcopy(self.trainer.optimizer.state_dict())
        config = self.trainer.adapter.peft_config_dict()

        def write() -> None:
            self.adapters.save_adapter(folder, peft, config, optimizer, self.meta.model)

        def landed(_: Any) -> None:
            self.registry.set_adapter_path(name, str(folder))
            self._prune_adapters()

        self.writer.submit(write, landed)

    def _adapter_folder(self, name: str) -> Any:
        return Path(self.config.train.checkpoint_dir) / "adapters" / name

    def _prune_adapters(self) -> None:
        pc = self.config.publish
        ids = [v.id for v in self.registry.page(10**9, 0) if v.adapter_path]
        protected = {self.registry.serving.id}
        for vid in self.adapters.prune_plan(ids, pc.keep_adapters_last, pc.keep_adapters_every,
                                            protected):
            name = f"v{vid}"
            path = self.registry.get(name).adapter_path
            if path:
                self.registry.set_adapter_path(name, None)  # no rollback to it from now on
                self.writer.submit(lambda p=path: shutil.rmtree(p, ignore_errors=True))

    # ------------------------------------------------------------------ rollback, checkpoints
    def rollback(self, to: str) -> dict[str, Any]:
        """Serves ``to``'s weights, adapter and AdamW state under a new id (one call).
        Raises KeyError (unknown), LookupError (no adapter kept) or RuntimeError (retry later)."""
        self.writer.flush()  # the target's adapter folder may still be landing
        target = self.registry.get(to)
        if target.state == "rejected":
            raise ValueError(f"{to} was rejected by the gate and was never served")
        if not self.host.can_publish():
            raise RuntimeError("a chunked prefill is in flight; retry in a moment")
        self.abandon_step()
        if target.name == "v0" and not target.adapter_path:
            self.trainer.reset_to_fresh()
        else:
            if not target.adapter_path:
                raise LookupError(f"the adapter of {to} is no longer kept (publish.keep_adapters_*)")
            peft_state, optimizer_state = self.adapters.load_adapter(target.adapter_path)
            self.trainer.load_adapter_state(peft_state, optimizer_state)
        frozen = self.trainer.adapter.snapshot()
        self.publisher.build_all(frozen)
        stall_ms = self.publisher.commit()
        self.trainer.set_published(frozen)
        c = self.counters
        c.train_state += 1
        c.steps_since_publish = 0
        version = self._mint_serving(step=target.step, parent=target.name, metric=target.metric)
        self._accepted = self._trainer_snapshot()
        self._open_round()  # Note [Rounds]: the next round trains at the new id
        logger.info("rollback to %s: now serving %s (stall %.1f ms)", to, version.name, stall_ms)
        return {"weight_version": version.name, "parent": target.name, "stall_ms": stall_ms}

    def checkpoint(self, *, is_blocking: bool = False) -> None:
        """Saves the loop's state (a copy, taken now) through the background writer;
        ``is_blocking`` waits until it is on disk (shutdown)."""
        c = self.counters
        # The open round's samples are not in the saved adapter yet: they are saved as pending.
        in_round = list(self._round.taken) if self._round is not None else []
        pending = [without_handle(p) for p in in_round + self._inflight]
        state = copy.deepcopy({"trainer": self.trainer.state_dict(), "versions": self.registry.state(),
                               "pending": [p.as_state() for p in pending] + self.queue.state(),
                               "rng": torch.get_rng_state(), "counters": vars(c),
                               "fates": vars(self.fates), "tally": vars(self.tally)})
        step, serving = c.steps, self.registry.serving.name
        c.last_checkpoint_at = self.clock()

        def write() -> None:
            self.checkpoints.save(step, state, self.meta)
            logger.info("checkpoint at step %d (%s serving)", step, serving)

        self.writer.submit(write)
        if is_blocking:
            self.writer.flush()

    def restore(self) -> bool:
        """Loads the newest compatible checkpoint and rebuilds the served weights from the master
        plus the serving version's adapter. Returns False when there was none."""
        state = self.checkpoints.load_latest(self.meta)
        if state is None:
            if self.registry.serving.name != "v0":
                # The registry outlived its checkpoints: the live weights are W0 again, which
                # gets a fresh id (ids are never reused, Note [Rebuild from the master]).
                self._mint_serving(step=0, parent="v0", metric=self.registry.v0_metric())
            else:
                self.host.announce("v0")
            return False
        self.trainer.load_state_dict(state["trainer"])
        self.registry.restore(state["versions"])
        self.queue.load_state(state["pending"])
        torch.set_rng_state(state["rng"])
        for key, value in state["counters"].items():
            if hasattr(self.counters, key):
                setattr(self.counters, key, value)
        for key, value in state.get("fates", {}).items():
            setattr(self.fates, key, value)
        for key, value in state.get("tally", {}).items():
            setattr(self.tally, key, value)
        self.counters.last_publish_at = self.counters.last_checkpoint_at = self.clock()
        if self.trainer.published is not None:
            self.publisher.build_all(self.trainer.published)
            self.publisher.commit()
        self.host.announce(self.registry.serving.name)
        self._accepted = self._trainer_snapshot()
        logger.info("restored checkpoint at step %d: serving %s, %d samples pending",
                    self.counters.steps, self.registry.serving.name, len(self.queue))
        return True

    def _trainer_snapshot(self) -> dict[str, Any] | None:
        """Copies of the adapter and AdamW state, the gate's "last accepted" point."""
        if not self.config.publish.gate.is_enabled:
            return None
        return {"peft": {k: v.clone() for k, v in self.trainer.adapter.peft_state_dict().items()},
                "optimizer": copy.deepcopy(self.trainer.optimizer.state_dict())}

    def _restore_trainer(self, snapshot: dict[str, Any] | None) -> None:
        """Back to the last accepted adapter and AdamW state; cumulative counters stay."""
        if snapshot is not None:
            self.trainer.load_adapter_state(snapshot["peft"], copy.deepcopy(snapshot["optimizer"]))

def without_handle(p: Any) -> Any:
    q = copy.copy(p)
    q.handle = None
    return q
