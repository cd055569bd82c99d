"""Work units: one optimizer step, or one no-grad scoring pass, run a bounded piece at a time.

Owns ``StepRun`` (``ReplayTrainer.begin_step``), ``ScoreRun`` (``ReplayTrainer.begin_scoring``) and
``UnitInfo``. Both runs follow one protocol: ``run_unit()`` runs exactly one unit and returns its
``UnitInfo``; ``is_done`` says when none is left. Imports only torch and lower train/ modules: the
trainer is a ``UnitTrainer`` (context.py), never imported.

Note [Work units]: a step over samples s = 0..n-1 (a micro-batch is one sample) runs, per sample,
  * one ``forward`` unit per decoder layer (graph_layer.py's ``layer_streams``), keeping that
    layer's graph. Layer l > 0 starts from detached, grad-requiring copies of BOTH streams layer
    l - 1 produced (hidden and residual: SGLang's Llama carries the residual separately; a graph
    sample's also the recorded rows' stand-in, Note [Graph replay]); layer 0 from the embedding;
  * ``head`` units over chunks of at most ``config.loss_chunk_rows`` loss rows: final add+RMSNorm,
    LM head and the chunk's share of the loss (objectives.py, Note [Chunked loss]), back-propagated
    at once into the last layer's detached outputs, whose ``.grad`` accumulates over chunks (KTO
    first runs its chunks without grad to learn the summed ratio; a KTO sample without
    ``ref_logprobs`` first runs a no-grad forward of the served weights, also layer by layer);
  * one ``backward`` unit per decoder layer, top down: ``torch.autograd.backward`` of the layer's
    outputs with the gradients its successor's inputs received; it accumulates the adapter's
    ``.grad``, hands down the gradients of both its inputs and frees the layer's graph;
then one ``optimizer`` unit: it checks that the loss and every adapter gradient are finite (one
host sync) and runs AdamW, or zeroes the gradients and skips (``StepStats.is_nonfinite_skipped``).
Every unit's arithmetic is the whole-sample forward's, so the loss and the gradients equal a
whole-sample backward to rounding (tests/unit/test_train_units.py). Grad mode is set per unit by
``run_unit`` (the scheduler's loop runs under no_grad); no grad-mode context spans two units.
Between units the caller may serve: the base tensors and the adapter must not change meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import ContextManager, Iterator, Literal

import torch

from alchemist_sgl.train.context import TrainSettings, UnitTrainer
from alchemist_sgl.train.forward import Streams, head_logprobs
from alchemist_sgl.train.graph_layer import first_streams, head_streams, layer_streams
from alchemist_sgl.train.layer import embed_streams, run_layer
from alchemist_sgl.train.lora import LoraAdapter
from alchemist_sgl.train.objectives import kto_loss_and_coefficient, token_loss_sum
from alchemist_sgl.train.offload import Key, SavedTensorOffload, long_lived_tensors
from alchemist_sgl.train.optimizer_unit import optimizer_unit
from alchemist_sgl.train.samples import PlanCounts, PlannedSample
from alchemist_sgl.train.stats import StepStats

UnitKind = Literal["forward", "head", "backward", "optimizer"]
Units = Iterator[tuple[UnitKind, int | None, int | None]]  # (kind, sample, layer) per unit


@dataclass(frozen=True)
class UnitInfo:
    kind: UnitKind
    sample: int | None     # index into the step's samples (or the scoring pairs); None: optimizer
    layer: int | None      # decoder layer of a forward/backward unit, else None
    ms: float              # wall time of the unit (perf_counter)


def loss_chunks(planned: PlannedSample, chunk_rows: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of at most ``chunk_rows`` tiling the loss rows [P - 1, P + R - 1)."""
    lo, hi = planned.prompt_len - 1, planned.input_ids.numel() - 1
    return [(a, min(a + chunk_rows, hi)) for a in range(lo, hi, chunk_rows)]


class _Run:
    """The shared protocol: a generator does one unit per ``next`` and yields (kind, sample,
    layer); the number of units is known up front, so ``is_done`` needs no look-ahead."""

    def __init__(self, units: Units, total: int, is_grad: bool) -> None:
        self._units, self._total, self._is_grad = units, total, is_grad
        self.units, self.busy_ms, self.max_unit_ms = 0, 0.0, 0.0

    @property
    def units_total(self) -> int:
        """How many units this run has in all."""
        return self._total

    @property
    def is_done(self) -> bool:
        return self.units >= self._total

    def run_unit(self) -> UnitInfo:
        """Runs exactly one unit (grad mode set for it alone). RuntimeError when all have run."""
        if self.is_done:
            raise RuntimeError("all units of this run have run")
        t0 = time.perf_counter()
        with torch.set_grad_enabled(self._is_grad):
            kind, sample, layer = next(self._units)
        ms = (time.perf_counter() - t0) * 1000.0
        self.units += 1
        self.busy_ms += ms
        self.max_unit_ms = max(self.max_unit_ms, ms)
        return UnitInfo(kind, sample, layer, ms)


def _count_units(trainer: UnitTrainer, planned: PlannedSample, is_grad: bool) -> int:
    layers, s = trainer.weights.spec.layers, planned.sample
    chunks = len(loss_chunks(planned, trainer.loss_chunk_rows))
    if not is_grad:
        return layers + chunks
    if s.kind == "negative" and trainer.config.objective_negative == "kto":
        return 2 * layers + 2 * chunks + (layers + chunks if s.ref_logprobs is None else 0)
    return 2 * layers + chunks


class StepRun(_Run):
    """One optimizer step as work units (Note [Work units]); made by ``ReplayTrainer.begin_step``.

    Gradients accumulate in the adapter between units: no other step may run meanwhile, and the
    base tensors must not change. ``finish()`` only after ``is_done``.
    """

    def __init__(self, trainer: UnitTrainer, plans: list[PlannedSample]) -> None:
        self.trainer, self.plans = trainer, plans
        self.weight_sum = sum(p.sample.weight for p in plans)
        self.loss, self.tokens = 0.0, 0  # loss: set by the optimizer unit
        self.counts = PlanCounts()
        self._losses: list[torch.Tensor] = []  # 0-d, detached: one per head chunk (KTO: sample)
        self._ratios: list[torch.Tensor] = []  # 0-d KTO summed log ratios
        self.is_nonfinite_skipped = self._is_injected = False
        total = sum(_count_units(trainer, p, True) for p in plans) + 1
        # memory.offload (offload.py, Note [Saved-tensor offload]); None: no hooks.
        self.offload = trainer.residency
        if self.offload is not None:
            self.offload.release_all()  # units an abandoned step left tracked
            self.offload.protect(long_lived_tensors(trainer))
        super().__init__(self._step_units(), total, is_grad=True)

    def inject_nonfinite(self) -> None:
        """Test hook: a NaN goes into one adapter gradient just before the optimizer unit."""
        self._is_injected = True

    @property
    def grad_scale(self) -> float:
        """1 / sum of the samples' weights: what the optimizer unit multiplies the accumulated
        ``.grad`` and loss terms by (rounds.py, Note [Round normalisation])."""
        return 1.0 / self.weight_sum

    def _step_units(self) -> Units:
        for index, planned in enumerate(self.plans):
            self.counts.add(planned.counts)
            self.tokens += planned.input_ids.numel()
            # rounds.py, Note [Round normalisation]: w_i now, 1 / sum(w) at the optimizer unit.
            yield from sample_units(self.trainer, self.offload, index, planned,
                                    planned.sample.weight, self._losses, self._ratios)
        self._optimizer_unit()
        yield "optimizer", None, None

    def _optimizer_unit(self) -> None:
        self.loss, self.grad_norm, self.is_nonfinite_skipped = optimizer_unit(
            self.trainer, self._losses, self._ratios, is_injected=self._is_injected,
            grad_scale=self.grad_scale)

    def finish(self) -> StepStats:
        """The step's stats (and the trainer's counters updated). All units must have run."""
        if not self.is_done:
            raise RuntimeError(f"{self._total - self.units} units of this step have not run")
        return self.trainer.record_step(self.loss, len(self.plans), self.tokens, self.counts,
                                        self.busy_ms, self.max_unit_ms, self.units,
                                        self.is_nonfinite_skipped)


class ScoreRun(_Run):
    """No-grad scoring of ``pairs`` in units (one per layer per pair, then head chunks); made by
    ``ReplayTrainer.begin_scoring``. ``which="published"``: the served weights as they are
    (y = W_pub x); ``"trained"``: W0 + s*BA of the current adapter (forward.py, Note [Published
    adapter]). ``result()`` = mean NLL per response token over all pairs."""

    def __init__(self, trainer: UnitTrainer, plans: list[PlannedSample],
                 which: Literal["trained", "published"]) -> None:
        if which not in ("trained", "published"):
            raise ValueError(f"unknown scoring target {which!r} (trained | published)")
        self.trainer, self.plans, self.which = trainer, plans, which
        self._logps: list[torch.Tensor] = []  # [chunk rows] fp32 per head unit
        total = sum(_count_units(trainer, p, False) for p in plans)
        super().__init__(self._score_units(), total, is_grad=False)

    def _score_units(self) -> Units:
        adapter = self.trainer.adapter if self.which == "trained" else None
        for index, planned in enumerate(self.plans):
            yield from nograd_logprob_units(self.trainer, planned, index, adapter, self._logps)

    def result(self) -> float:
        """Mean NLL (nats) per response token over all pairs. Raises RuntimeError before done."""
        if not self.is_done:
            raise RuntimeError(f"{self._total - self.units} scoring units have not run")
        logp = torch.cat(self._logps)
        return -float(logp.sum()) / logp.numel()  # host sync: once per scoring


def nograd_logprob_units(trainer: UnitTrainer, planned: PlannedSample, index: int,
                         adapter: LoraAdapter | None, out: list[torch.Tensor]) -> Units:
    """A no-grad forward in units: one per layer, then one per loss chunk, appending each chunk's
    log-probs [hi - lo] to ``out``. ``adapter=None`` computes the served weights as they are."""
    w = trainer.weights
    hidden, residual = embed_streams(trainer.layer_context(), planned)
    for layer in range(w.spec.layers):
        with torch.no_grad():
            hidden, residual = run_layer(trainer.layer_context(), layer, adapter, planned, hidden,
                                         residual)
        yield "forward", index, layer
    for lo, hi in loss_chunks(planned, trainer.loss_chunk_rows):
        with torch.no_grad():
            out.append(head_logprobs(w, planned, hidden, residual, lo, hi))
        yield "head", index, None


def sample_units(t: UnitTrainer, off: SavedTensorOffload | None, index: int,
                 planned: PlannedSample, scale: float, losses: list[torch.Tensor],
                 ratios: list[torch.Tensor]) -> Units:
    """One sample's units (Note [Work units]): forward per layer, head chunks, backward per layer.
    Its loss enters the adapter's ``.grad`` multiplied by ``scale``; the detached loss terms go to
    ``losses`` (and KTO summed ratios to ``ratios``). ``off``: the saved-tensor offload or None."""
    w, spec, s = t.weights, t.weights.spec, planned.sample
    is_kto = s.kind == "negative" and t.config.objective_negative == "kto"
    ref = s.ref_logprobs
    if is_kto and ref is None:  # objectives.py, Note [Reference log-probs], option (2)
        out: list[torch.Tensor] = []
        yield from nograd_logprob_units(t, planned, index, None, out)
        ref = torch.cat(out)
    # Forward units: each layer from detached copies of its inputs.
    streams = first_streams(t.layer_context(), planned)
    graphs: list[tuple[Streams, Streams] | None] = []
    for layer in range(spec.layers):
        if layer > 0:
            streams = _leaves(streams)
        with _saving(off, (index, layer)):
            outs = layer_streams(t.layer_context(), layer, t.adapter, planned, streams)
        if off is not None:  # forward order: layer 0 goes to host first
            off.keep((index, layer), [*streams, *outs])
            off.offload((index, layer))
        graphs.append((streams, outs))
        streams = outs
        yield "forward", index, layer
    top = _leaves(streams)
    top_h, top_r, row0 = head_streams(planned, top)
    chunks = loss_chunks(planned, t.loss_chunk_rows)
    n_resp = planned.input_ids.numel() - planned.prompt_len
    coef = None
    if is_kto:  # Note [Chunked loss]: the summed ratio first, without grad
        assert ref is not None  # given, or just computed above
        logps = []
        for lo, hi in chunks:
            with torch.no_grad():
                logps.append(head_logprobs(w, planned, top_h, top_r, lo, hi, row0))
            yield "head", index, None
        ratio = (torch.cat(logps) - ref.to(logps[0])).sum()
        kto, coef = kto_loss_and_coefficient(ratio, t.kl_ema)
        losses.append(kto * scale)
        ratios.append(ratio)
    for lo, hi in chunks:
        logp = head_logprobs(w, planned, top_h, top_r, lo, hi, row0)
        if coef is None:
            loss = token_loss_sum(s.kind, t.config.objective_negative, logp) * (scale / n_resp)
            losses.append(loss.detach())
        else:
            loss = (coef * scale) * logp.sum()
        loss.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward is unannotated
        yield "head", index, None
    # Backward units, top down; each frees its layer's graph.
    grads = _grads(top)
    for layer in reversed(range(spec.layers)):
        if off is not None:  # backward order, prefetching one layer ahead
            off.prefetch((index, layer))
            off.prefetch((index, layer - 1))
        graph = graphs[layer]
        assert graph is not None  # each layer's backward runs once
        ins, outs = graph
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and o is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = _grads(ins)
        graphs[layer] = None
        if off is not None:
            off.release((index, layer))
        yield "backward", index, layer


def _saving(off: SavedTensorOffload | None, key: Key) -> ContextManager[None]:
    return contextlib.nullcontext() if off is None else off.saving(key)


def _leaves(streams: Streams) -> Streams:
    """Detached, grad-requiring copies (no data copy) of a layer's outputs: the next unit's inputs."""
    return [None if t is None else t.detach().requires_grad_() for t in streams]


def _grads(streams: Streams) -> list[torch.Tensor | None]:
    return [None if t is None or not t.requires_grad else t.grad for t in streams]


def check_unit_support(config: TrainSettings, layout: str) -> None:
    """Work units cover both layouts in exact mode; raises ValueError otherwise."""
    if layout not in ("joint", "segments") or config.gradient_mode != "exact":
        raise ValueError(f"work units need train.gradient_mode='exact' (got {layout!r}, "
                         f"{config.gradient_mode!r}); use ReplayTrainer.accumulate or step")

