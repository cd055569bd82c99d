"""The trainer arms of the ``replay`` experiment: timed steps, gradients, saved-tensor memory.

Owns ``Capture`` (post-accumulate-grad hooks on the adapter: event times), ``timed_step`` (one
``ReplayTrainer.step`` with its sample building inside the timed region), ``step_grads`` (the
gradient a step hands AdamW, the trainer restored afterwards), ``substitute_all_rows`` (the
ceiling arm), ``peak_saved_bytes``, ``one`` (one sample's build) and ``planned_counts``
(replayed tokens and graph samples as the trainer plans them). Uses only the trainer's ``step``,
``plan``, ``adapter`` and ``optimizer``, so any layout or ``train.compile`` setting runs here
unchanged. Imports torch and package value types.

Note [Ceiling plan]: the ceiling arm is the recompute step (replay off: prompt + response planned
as ONE computed segment) with that segment's plan given the recorded outputs of EVERY row for
the plan's projections, so it skips those matmuls on all rows and changes nothing else (no store,
no segment split). It is a trainer built from the same config with ``plan`` wrapped on the
instance; a trainer whose ``step`` stops planning through ``plan`` makes this arm fail loudly.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Mapping, Sequence

import torch

Build = Callable[[], tuple[list[Any], Callable[[], None]]]  # -> (samples, release)


def adapter_params(adapter) -> list[tuple[str, torch.nn.Parameter]]:
    """(PEFT name, parameter) for every LoRA tensor of ``adapter``."""
    from alchemist_sgl.train.lora import peft_name

    out = []
    for layer in range(adapter.spec.layers):
        for t in adapter.targets:
            out.append((peft_name(layer, t, "A"), adapter.a[f"{layer}_{t}"]))
            out.append((peft_name(layer, t, "B"), adapter.b[f"{layer}_{t}"]))
    return out


class Capture:
    """Hooks on the adapter's parameters during a step: ``events`` (perf_counter of every gradient
    accumulation)."""

    def __init__(self, adapter) -> None:
        self.params = adapter_params(adapter)
        self.events: list[float] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "Capture":
        for name, p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self.events.append(time.perf_counter())
        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def timed_step(trainer, build: Build) -> tuple[float, float, list[float]]:
    """(seconds, start time, gradient event times) of building the samples (store lookups
    included), one ``trainer.step`` and releasing the samples' pins."""
    with Capture(trainer.adapter) as cap:
        t0 = time.perf_counter()
        samples, release = build()
        trainer.step(samples)
        release()
        seconds = time.perf_counter() - t0
    return seconds, t0, cap.events


def snapshot(trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return ({k: v.detach().clone() for k, v in trainer.adapter.state_dict().items()},
            copy.deepcopy(trainer.optimizer.state_dict()))


def restore(trainer, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
    with torch.no_grad():
        trainer.adapter.load_state_dict(state[0])
    trainer.optimizer.load_state_dict(copy.deepcopy(state[1]))


def step_grads(trainer, build: Build) -> dict[str, torch.Tensor]:
    """The gradient one ``trainer.step`` hands AdamW (fp64, by PEFT name), read in an optimizer
    step pre-hook: after the optimizer unit's normalisation by the samples' total weight
    (train/optimizer_unit.py), which scales the accumulated ``.grad`` in place. Adapter and
    optimizer state are restored afterwards, so the step leaves no trace."""
    state = snapshot(trainer)
    params = adapter_params(trainer.adapter)
    grads: dict[str, torch.Tensor] = {}

    def pre_step(*_: Any) -> None:
        grads.update({name: p.grad.detach().double().clone() for name, p in params if p.grad is not None})

    samples, release = build()
    handle = trainer.optimizer.register_step_pre_hook(pre_step)
    try:
        trainer.step(samples)
    finally:
        handle.remove()
        release()
        restore(trainer, state)
    if not grads:
        raise RuntimeError("the step handed AdamW no adapter gradient (skipped as non-finite?)")
    return grads


def substitute_all_rows(trainer, rows: Mapping[tuple[int, ...], Mapping[str, torch.Tensor]]) -> None:
    """Makes ``trainer`` the ceiling arm (Note [Ceiling plan]); ``rows``: prompt ids -> the plan's
    outputs [layers, P + R, width] of prompt + response."""
    from alchemist_sgl.train.samples import PlannedSample, PlannedSegment

    original = trainer.plan

    def plan(sample, **kw):
        planned = original(sample, is_replay_enabled=False)
        n = planned.input_ids.numel()
        if len(planned.segments) != 1 or planned.segments[0].end != n:
            raise RuntimeError("the recompute plan is not one computed segment")
        recorded = rows[tuple(int(t) for t in sample.prompt_ids)]
        return PlannedSample(planned.input_ids, planned.prompt_len,
                             (PlannedSegment(0, n, dict(recorded), 0),), planned.sample, planned.counts)

    trainer.plan = plan


def peak_saved_bytes(trainer, builds: Sequence[Build], exclude: set[int]) -> int:
    """Max over single-sample steps of the bytes of unique storages autograd saved (storages in
    ``exclude``: base weights and adapter, not counted), plus the copied recordings the sample
    holds (counted once whether or not autograd also saved them; none for recordings read a layer
    at a time from the store's pages, which the store owns) and the ``PromptGraph`` a graph sample
    carries (rebuilt from the store's rows when the sample is built). Trainer restored afterwards."""
    state = snapshot(trainer)
    peak = 0
    try:
        for build in builds:
            samples, release = build()
            records = {}
            for s in samples:
                for seg in s.segments:
                    if seg.recording is not None:
                        for t in seg.recording.tensors.values():
                            if not isinstance(t, torch.Tensor):
                                continue  # read a layer at a time from the store's pages
                            st = t.untyped_storage()
                            records[st.data_ptr()] = st.nbytes()
                for rec in (s.graph.layers if s.graph is not None else ()):
                    for t in vars(rec).values():
                        st = t.untyped_storage()
                        records[st.data_ptr()] = max(records.get(st.data_ptr(), 0), st.nbytes())
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in exclude and ptr not in records:
                    seen[ptr] = st.nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                trainer.step(samples)
            release()
            peak = max(peak, sum(seen.values()) + sum(records.values()))
    finally:
        restore(trainer, state)
    return peak


def base_storages(weights, trainers: Sequence[Any]) -> set[int]:
    """Storage pointers of the base weights and every trainer's adapter parameters."""
    out = {weights.embed.untyped_storage().data_ptr(), weights.final_norm.untyped_storage().data_ptr()}
    for lw in weights.layers:
        for t in (lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_layernorm, lw.post_attention_layernorm):
            out.add(t.untyped_storage().data_ptr())
    for tr in trainers:
        out |= {p.untyped_storage().data_ptr() for p in tr.adapter.parameters()}
    return out


def one(build_all: Build, i: int) -> Build:
    """The build of sample ``i`` of ``build_all`` alone."""
    def build():
        samples, release = build_all()
        return [samples[i]], release
    return build


def planned_counts(trainer, build) -> tuple[list[int], int]:
    """(replayed prompt tokens per sample, samples planned with graph replay) as ``trainer``
    plans the built samples (graph replay: P - 1 rows, samples.py ``plan_sample``)."""
    samples, release = build()
    try:
        counts = [trainer.plan(x).counts for x in samples]
    finally:
        release()
    return [c.replayed_tokens for c in counts], sum(c.graph_samples for c in counts)
