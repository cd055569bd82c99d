"""Capture: copies planned projection outputs of prefill (extend) forwards into the store.

Owns the per-forward recording protocol and its failure policy; knows nothing of SGLang (the
sglang side, ``integration/capture_hooks.py``, turns SGLang's batch into ``RequestExtend`` views
and calls ``begin`` / ``on_output`` / ``end``). Must not import sglang.

Protocol, per model forward, on the scheduler thread:
  ``begin(extends)`` before the first layer (decode-only forwards: don't call, or pass no extends);
  ``on_output(name, layer, output)`` from each planned projection's forward hook, ``output`` the
  batch's flattened BASE projection output ``[rows, width]``, copied before returning (the caller
  may overwrite it in place afterwards: GPU fused add-rmsnorm and LoRA do);
  ``end()`` after the forward.

Note [Never raise into serving]: a hook that raises kills SGLang's scheduler (PLATFORM.md). Every
public method here catches any exception, logs it with its traceback, disables recording for the
life of the process, reports the reason through ``on_failure`` (the runtime shows it in
``/alchemist/status.disabled``) and returns normally. Serving continues without recording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from alchemist_sgl.log import get_logger
from alchemist_sgl.record.plan import RecordPlan
from alchemist_sgl.records import RequestExtend
from alchemist_sgl.store import ActivationStore, BatchWrite

logger = get_logger(__name__)


class InjectedRecordFault(RuntimeError):
    """Raised on purpose by a fault-injection setting (tests only)."""


class Capture:
    """The recording side of serving: forward-by-forward copies into an ``ActivationStore``.

    ``is_enabled``: the server-wide ``record.enabled``. ``fault_after_forwards``: tests only;
    raise ``InjectedRecordFault`` inside the N-th recording forward. ``dump_dir``: tests only;
    after a request's last prefill forward, write its stitched recording (see ``_dump``).
    """

    def __init__(self, store: ActivationStore, plan: RecordPlan, *, is_enabled: bool = True,
                 on_failure: Callable[[str], None] | None = None,
                 fault_after_forwards: int | None = None, dump_dir: str | Path | None = None
                 ) -> None:
        self.store = store
        self.plan = plan
        self.is_enabled = is_enabled
        self.failure: str | None = None
        self._on_failure = on_failure
        self._batch: BatchWrite | None = None
        self._finished: list[RequestExtend] = []
        self._planned = frozenset(plan.tensors)
        self._fault_after = fault_after_forwards
        self._dump_dir = Path(dump_dir) if dump_dir else None
        self.forwards_recorded = 0
        self.tokens_recorded = 0

    @property
    def is_recording(self) -> bool:
        """True between ``begin`` and ``end`` of a forward that has rows to record."""
        return self._batch is not None

    def begin(self, extends: Sequence[RequestExtend]) -> None:
        if not self.is_enabled or self.failure is not None or not self._planned:
            return
        try:
            if self._batch is not None:  # a forward that never reached end(): drop it
                self.store.discard_batch(self._batch)
                self._batch = None
            todo = [e for e in extends if e.is_recording
                    and e.recorded_range[1] > e.recorded_range[0]]
            if not todo:
                return
            self._batch = self.store.open_batch(todo)
            self._finished = [e for e in todo if e.recorded_range[1] >= len(e.prompt_tokens)]
            self.tokens_recorded += sum(e.recorded_range[1] - e.recorded_range[0] for e in todo)
            if self._fault_after is not None and self.forwards_recorded + 1 >= self._fault_after:
                raise InjectedRecordFault(
                    f"injected recording fault in forward {self.forwards_recorded + 1}")
        except Exception as exc:  # Note [Never raise into serving]
            self._fail("begin", exc)

    def on_output(self, name: str, layer: int, output: torch.Tensor) -> None:
        batch = self._batch
        if batch is None or name not in self._planned:
            return
        try:
            self.store.write(batch, name, layer, output)
        except Exception as exc:  # Note [Never raise into serving]
            self._fail(f"write {name} layer {layer}", exc)

    def end(self) -> None:
        batch = self._batch
        if batch is None:
            return
        self._batch = None
        try:
            self.store.close_batch(batch)
            self.forwards_recorded += 1
            if self._dump_dir is not None:
                for ext in self._finished:
                    self._dump(ext)
        except Exception as exc:  # Note [Never raise into serving]
            self._fail("end", exc)
        finally:
            self._finished = []

    def abort(self, rid: str) -> None:
        try:
            self.store.abort(rid)
        except Exception as exc:  # Note [Never raise into serving]
            self._fail("abort", exc)

    def status(self) -> dict[str, object]:
        return {"enabled": self.is_enabled and self.failure is None, "failure": self.failure,
                "forwards_recorded": self.forwards_recorded,
                "tokens_recorded": self.tokens_recorded}

    def _fail(self, where: str, exc: BaseException) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            try:
                self.store.discard_batch(batch)
            except Exception:  # already failing; the store is not used again
                logger.exception("discarding the failed forward's pages failed")
        self._finished = []
        self.failure = f"recording failed in {where}: {type(exc).__name__}: {exc}"
        logger.error("disabling recording, serving continues: %s", self.failure, exc_info=exc)
        if self._on_failure is not None:
            try:
                self._on_failure(self.failure)
            except Exception:  # the report itself failed: already logged above, keep serving
                logger.exception("reporting the recording failure failed")

    def _dump(self, ext: RequestExtend) -> None:
        """Tests only: ``{rid, tokens, namespace, covered, tensors}`` to ``dump_dir/<n>.pt``.

        ``tensors[name]`` is [layers, covered_tokens, width] for the covered ranges, in order.
        Written to a temporary name and renamed, so a reader never sees a partial file.
        """
        assert self._dump_dir is not None
        pin = self.store.pin(ext.prompt_tokens, ext.namespace)
        try:
            payload = {"rid": ext.rid, "tokens": list(ext.prompt_tokens),
                       "namespace": (ext.namespace.base_version, ext.namespace.adapter),
                       "covered": list(pin.coverage.covered), "tensors": self.store.gather(pin)}
        finally:
            self.store.unpin(pin)
        self._dump_dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.forwards_recorded:06d}-{len(list(self._dump_dir.iterdir())):06d}"
        tmp = self._dump_dir / f".{name}.tmp"
        torch.save(payload, tmp)
        tmp.rename(self._dump_dir / f"{name}.pt")
