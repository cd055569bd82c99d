"""Compiling the trainer's layers before serving starts (layer.py, Note [Compiled layer]).

Owns ``warm_up_compiled``: runs the work units of synthetic steps through every graph the online
loop needs, so that ``torch.compile`` compiles them at startup and never inside the scheduler
loop, then (``is_frozen``) switches torch.compile to "eager on recompile": a shape or mode that no
warm-up graph covers runs eager instead of stalling serving for a compile. Imports only torch.

The graphs warmed, per (recorded projections) set: the lag-0 form (right after a publish) and
the full form (a publish pending), each with the prompt replayed and recomputed; layer 0 always
runs eager (it differs in its inputs and is 1/L of the work). The trainer's adapter, AdamW state,
counters and published adapter are left as they were: no optimizer step runs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import torch

from alchemist_sgl.train.samples import PromptSegment, Recording, Sample
from alchemist_sgl.train.spec import PROJECTIONS

if TYPE_CHECKING:
    from alchemist_sgl.train.trainer import ReplayTrainer


def _synthetic(trainer: "ReplayTrainer", names: Sequence[str], is_replay: bool,
               prompt_len: int, response_len: int) -> Sample:
    spec, w = trainer.weights.spec, trainer.weights
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab, (prompt_len + response_len,), generator=gen)
    segments: tuple[PromptSegment, ...] = ()
    if is_replay:
        tensors = {n: torch.zeros(spec.layers, prompt_len, spec.out_dim(n), dtype=w.dtype,
                                  device=w.device) for n in names}
        segments = (PromptSegment(0, prompt_len, Recording(trainer.version, tensors)),)
    return Sample(ids[:prompt_len], ids[prompt_len:], segments)


def warm_up_compiled(trainer: "ReplayTrainer", names: Sequence[str] = PROJECTIONS, *,
                     prompt_len: int = 48, response_len: int = 16,
                     is_frozen: bool = True) -> dict[str, float]:
    """Compiles the loop's graphs (module docstring); returns {"compile_s", "steps"}. A no-op
    returning compile_s 0 when the trainer does not compile."""
    if not trainer.is_compiled:
        return {"compile_s": 0.0, "steps": 0}
    saved = (trainer.published, trainer._is_published_current)
    t0, steps = time.perf_counter(), 0
    try:
        for allow_lag0 in (True, False):
            trainer.set_published(trainer.adapter.snapshot(), allow_lag0_form=allow_lag0)
            for is_replay in (True, False):
                run = trainer.begin_step([_synthetic(trainer, names, is_replay, prompt_len,
                                                     response_len)])
                while run.units < run.units_total - 1:  # everything but the optimizer unit
                    run.run_unit()
                steps += 1
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.published, trainer._is_published_current = saved
    if is_frozen:
        torch.compiler.set_stance("eager_on_recompile")
    return {"compile_s": round(time.perf_counter() - t0, 3), "steps": steps}
