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

Note [Never raise into serving]: a hook that raises kills SGLang's scheduler (docs/architecture.md, "Processes"). Every
public method here catches any exception, logs it with its traceback, disables recording for the
life of the process, reports the reason through ``on_failure`` (the runtime shows it in
``/alchemist/status.disabled``) and returns normally. Serving continues without recording.

Note [Every planned output, once]: a forward is published only if ``on_output`` saw each planned
(tensor, layer) exactly once: ``len(plan.tensors) * layers`` calls. Fewer means some projection
hooks did not run, e.g. the forward (or part of it) replayed a CUDA graph, where Python forward
hooks never fire, or a kernel fused a projection away (SM100 fuses gate_up with SiLU). Publishing
then would store pages with stale rows for the missing layers, which replay would use as exact. So
the forward is discarded and recording disabled loudly (``incomplete_forwards`` in the status). A
prefill that never reached the model's hooks at all is reported by the sglang side through
``on_prefill_without_hooks`` (integration/capture_hooks.py) with the same effect.

Note [Where the copy goes]: rows routed to a tier on the output's device (the store's device tier)
are written at once, stream-ordered on the forward stream. Rows for the host tier go through
``HostStaging`` (record/staging.py, Note [Async recording copies]) when the output is on CUDA:
copied asynchronously into pinned reused buffers and scattered into the host tier when each copy
is complete (all of them before ``end`` publishes). On CPU the output already is host memory and
is written into the host tier directly (one copy, the cheapest: store/pool.py, Note [Reused pool]),
unless ``staging=True`` forces the staged path (plain copies; tests use it to run the CUDA
protocol on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from alchemist_sgl.log import get_logger
from alchemist_sgl.core.plan import RecordPlan
from alchemist_sgl.record.staging import HostStaging
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.store import ActivationStore, BatchWrite

logger = get_logger(__name__)
_Tag = tuple[BatchWrite, str, int]  # a staged copy: (routes, tensor name, layer)


class InjectedRecordFault(RuntimeError):
    """Raised on purpose by a fault-injection setting (tests only)."""


class IncompleteForwardError(RuntimeError):
    """A recording forward saw fewer or more planned outputs than planned (Note [Every planned
    output, once])."""


_GRAPH_HINT = ("did the forward run in a CUDA graph? Recording needs eager prefill: set "
               "sglang.cuda-graph-backend-prefill: disabled")


@dataclass
class _SplitBatch:
    """One forward's routes by copy path (Note [Where the copy goes]). ``staged``: per host route,
    a BatchWrite over the compacted rows and the index of those rows in the batch's output."""

    direct: BatchWrite
    staged: list[tuple[BatchWrite, slice | torch.Tensor]]


class Capture:
    """The recording side of serving: forward-by-forward copies into an ``ActivationStore``.

    ``is_enabled``: the server-wide ``record.enabled``. ``staging``: None (auto: host-tier rows
    staged when the outputs are not on the CPU), True (always; tests run the CUDA protocol on CPU
    with it), False (never); ``staging_depth``: host buffers in the ring (record/staging.py).
    ``fault_after_forwards``: tests only; raise ``InjectedRecordFault`` inside the N-th recording
    forward. ``dump_dir``: tests only; after a request's last prefill forward, write its stitched
    recording (see ``_dump``).
    """

    def __init__(self, store: ActivationStore, plan: RecordPlan, *, is_enabled: bool = True,
                 on_failure: Callable[[str], None] | None = None,
                 staging: bool | None = None, staging_depth: int = 8,
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
        self._expected_outputs = len(plan.tensors) * plan.shape.layers
        self._outputs_seen = 0
        self._staging_mode = staging
        self._staging_depth = staging_depth
        self._staging: HostStaging[_Tag] | None = None
        self._split: _SplitBatch | None = None
        self._fault_after = fault_after_forwards
        self._dump_dir = Path(dump_dir) if dump_dir else None
        self.forwards_recorded = 0
        self.tokens_recorded = 0
        self.incomplete_forwards = 0

    @property
    def is_recording(self) -> bool:
        """True between ``begin`` and ``end`` of a forward that has rows to record."""
        return self._batch is not None

    def begin(self, extends: Sequence[RequestExtend]) -> None:
        if not self.is_enabled or self.failure is not None or not self._planned:
            return
        try:
            if self._batch is not None:  # a forward that never reached end(): drop it
                self._drop_forward()
            todo = [e for e in extends if e.is_recording
                    and e.recorded_range[1] > e.recorded_range[0]]
            if not todo:
                return
            self._batch = self.store.open_batch(todo)
            self._outputs_seen = 0
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
            self._outputs_seen += 1
            if not self._is_staged(output):
                self.store.write(batch, name, layer, output)
                return
            split = self._split if self._split is not None else self._split_batch(batch, output)
            if split.direct.routes:  # same-device tier: written now, stream-ordered
                self.store.write(split.direct, name, layer, output)
            staging = self._staging_for(output)
            for compact, index in split.staged:
                staging.put((compact, name, layer), output, index)
        except Exception as exc:  # Note [Never raise into serving]
            self._fail(f"write {name} layer {layer}", exc)

    def end(self) -> None:
        batch = self._batch
        if batch is None:
            return
        try:
            if self._outputs_seen != self._expected_outputs:  # Note [Every planned output, once]
                self.incomplete_forwards += 1
                raise IncompleteForwardError(
                    f"a prefill forward with rows to record saw {self._outputs_seen} of the "
                    f"{self._expected_outputs} planned projection outputs "
                    f"({len(self._planned)} tensors x {self.plan.shape.layers} layers); "
                    f"nothing of it was published; {_GRAPH_HINT}")
            if self._split is not None:
                if self._staging is not None:
                    self._staging.flush()  # host waits for this forward's copies
                batch.elapsed_s += self._split.direct.elapsed_s + sum(
                    c.elapsed_s for c, _ in self._split.staged)
            self._batch, self._split = None, None
            self.store.close_batch(batch)
            self.forwards_recorded += 1
            if self._dump_dir is not None:
                for ext in self._finished:
                    self._dump(ext)
        except Exception as exc:  # Note [Never raise into serving]
            self._fail("end", exc)
        finally:
            self._finished = []

    def on_prefill_without_hooks(self, description: str) -> None:
        """The sglang side saw a prefill batch run without the model's hooks firing (a graph)."""
        if not self.is_enabled or self.failure is not None:
            return
        self.incomplete_forwards += 1
        self._fail("prefill", IncompleteForwardError(
            f"{description}: the model's forward hooks did not run, so it recorded nothing; "
            f"{_GRAPH_HINT}"))

    def abort(self, rid: str) -> None:
        try:
            self.store.abort(rid)
        except Exception as exc:  # Note [Never raise into serving]
            self._fail("abort", exc)

    def status(self) -> dict[str, object]:
        return {"enabled": self.is_enabled and self.failure is None, "failure": self.failure,
                "forwards_recorded": self.forwards_recorded,
                "tokens_recorded": self.tokens_recorded,
                "incomplete_forwards": self.incomplete_forwards,
                "staging": self._staging.status() if self._staging is not None else None}

    # ------------------------------------------------------------------ staged copies
    def _is_staged(self, output: torch.Tensor) -> bool:
        if self._staging_mode is not None:
            return self._staging_mode
        return output.device.type != "cpu"

    def _split_batch(self, batch: BatchWrite, output: torch.Tensor) -> _SplitBatch:
        """Routes to the host tier are staged (compacted rows); the others are written directly.

        Reads ``BatchWrite.routes``: per tier ``(pool, src, slots, rows, contiguous)``, ``src``
        the rows of the batch's output (store/activation_store.py)."""
        direct, staged = [], []
        for route in batch.routes:
            pool, src, slots, rows, contiguous = route
            if pool.tier != "host":
                direct.append(route)
                continue
            n = int(src.numel())
            compact = BatchWrite([(pool, torch.arange(n), slots, rows, slice(0, n))], [], [])
            # Once per forward: the row index on the output's device (a small host-to-device
            # copy from pageable memory, synchronous on CUDA; the contiguous case needs none).
            index = contiguous if contiguous is not None else src.to(output.device)
            staged.append((compact, index))
        self._split = _SplitBatch(BatchWrite(direct, [], []), staged)
        return self._split

    def _staging_for(self, output: torch.Tensor) -> HostStaging[_Tag]:
        staging = self._staging
        if staging is None or staging.dtype != output.dtype or staging.device != output.device:
            if staging is not None:
                staging.flush()
            staging = self._staging = HostStaging(self._staging_depth, output.dtype,
                                                  output.device, self._write_staged)
        return staging

    def _write_staged(self, tag: _Tag, rows: torch.Tensor) -> None:
        compact, name, layer = tag
        self.store.write(compact, name, layer, rows)

    def _drop_forward(self) -> None:
        """Forgets the open forward: copies in flight are waited for and dropped, pages freed."""
        batch, self._batch, self._split = self._batch, None, None
        if self._staging is not None:
            self._staging.discard()
        if batch is not None:
            self.store.discard_batch(batch)

    def _fail(self, where: str, exc: BaseException) -> None:
        try:
            self._drop_forward()
        except Exception:  # already failing; the store is not used again
            logger.exception("discarding the failed forward's pages failed")
            self._batch, self._split = None, None
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
        pin = self.store.pin(ext.prompt_tokens, ext.namespace, rid=ext.rid)
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
