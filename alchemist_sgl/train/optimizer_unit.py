"""The optimizer unit of a step or a round: scale, check finiteness, AdamW, zero the gradients.

Owns ``optimizer_unit`` and ``is_step_finite`` (units.py's ``StepRun`` and rounds.py's ``RoundRun``
both end with it; rounds.py, Note [Round normalisation]). Imports only torch and context.py (the
trainer is a ``UnitTrainer``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from alchemist_sgl.train.context import UnitTrainer


def optimizer_unit(t: UnitTrainer, losses: list[torch.Tensor], ratios: list[torch.Tensor], *,
                   is_injected: bool = False, grad_scale: float = 1.0) -> tuple[float, float, bool]:
    """The optimizer unit: multiplies every adapter ``.grad`` (and the loss) by ``grad_scale``,
    checks that they are finite (one host sync) and runs AdamW, or skips; zeroes the gradients.
    ``is_injected`` (tests) puts a NaN into one gradient first. Returns (loss, grad norm, skipped)."""
    grads = [p.grad for p in t.adapter.parameters() if p.grad is not None]
    if grad_scale != 1.0:
        for g in grads:
            g.mul_(grad_scale)
    if is_injected and grads:
        grads[0].view(-1)[0] = float("nan")
    loss = float(torch.stack(losses).sum()) * grad_scale if losses else 0.0  # host sync: once per step
    norms = [g.detach().float().norm() for g in grads]
    grad_norm = float(torch.stack(norms).norm()) if norms else 0.0  # host sync, once per step
    is_skipped = not is_step_finite(loss, grads)
    if not is_skipped:
        t.optimizer.step()
        t.on_optimizer_step([float(r) for r in ratios])
    t.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, is_skipped


def is_step_finite(loss: float, grads: Sequence[torch.Tensor]) -> bool:
    """The loss and every gradient in ``grads`` finite (one host sync for all gradients)."""
    return math.isfinite(loss) and (not grads or bool(
        torch.stack([g.isfinite().all() for g in grads]).all()))
