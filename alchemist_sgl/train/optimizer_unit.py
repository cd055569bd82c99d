"""The optimizer unit of a step or a round: scale, check finiteness, AdamW, zero the gradients.

Owns ``optimizer_unit`` and ``is_step_finite`` (units.py's ``StepRun`` and rounds.py's ``RoundRun``
both end with it; rounds.py, Note [Round normalisation]). Imports only torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from alchemist_sgl.train.trainer import ReplayTrainer


def optimizer_unit(t: "ReplayTrainer", losses: list[torch.Tensor], ratios: list[torch.Tensor], *,
                   is_injected: bool = False, grad_scale: float = 1.0) -> tuple[float, float, bool]:
    """The optimizer unit: multiplies every adapter ``.grad`` (and the loss) by ``grad_scale``,
    checks that they are finite (one host sync) and runs AdamW, or skips; zeroes the gradients.
    ``is_injected`` (tests) puts a NaN into one gradient first. Returns (loss, grad norm, skipped)."""
    params = [p for p in t.adapter.parameters() if p.grad is not None]
    if grad_scale != 1.0:
        for p in params:
            p.grad.mul_(grad_scale)
    if is_injected and params:
        params[0].grad.view(-1)[0] = float("nan")
    loss = float(torch.stack(losses).sum()) * grad_scale if losses else 0.0  # host sync: once per step
    grads = [p.grad.detach().float().norm() for p in params]
    grad_norm = float(torch.stack(grads).norm()) if grads else 0.0  # host sync, once per step
    is_skipped = not is_step_finite(loss, params)
    if not is_skipped:
        t.optimizer.step()
        t._is_published_current = False
        t.update_kl([float(r) for r in ratios])
    t.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, is_skipped


def is_step_finite(loss: float, params: list[torch.Tensor]) -> bool:
    """The loss and every ``.grad`` of ``params`` finite (one host sync for all gradients)."""
    return math.isfinite(loss) and (not params or bool(
        torch.stack([p.grad.isfinite().all() for p in params]).all()))
