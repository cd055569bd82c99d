"""The negative objectives (alchemist_sgl/train/objectives.py) against values computed by hand with
the ``math`` module: unlikelihood on both the whole-sample path (``sample_loss``) and the work
units' per-token path (``token_loss_sum``), KTO's loss on the whole-sample path and its (loss,
dL/dr) pair that the work units use, dL/dr checked by a finite difference."""

from __future__ import annotations

import math

import pytest
import torch

from alchemist_sgl.train.objectives import (
    KTO_BETA, kto_loss_and_coefficient, kto_negative_loss, sample_loss, token_loss_sum)

PROBS = (0.5, 0.25, 0.9)


def _hand_unlikelihood_terms() -> list[float]:
    return [-math.log(1.0 - p) for p in PROBS]  # 0.6931..., 0.2876..., 2.3025...


def _hand_kto(ratio: float, kl: float, beta: float = KTO_BETA) -> float:
    return 1.0 - 1.0 / (1.0 + math.exp(-beta * (max(kl, 0.0) - ratio)))


def test_unlikelihood_whole_sample_and_per_token_match_the_hand_value() -> None:
    logp = torch.tensor([math.log(p) for p in PROBS], dtype=torch.float64)
    terms = _hand_unlikelihood_terms()
    assert float(sample_loss("negative", "unlikelihood", logp)) == pytest.approx(sum(terms) / 3, rel=1e-12)
    assert float(token_loss_sum("negative", "unlikelihood", logp)) == pytest.approx(sum(terms), rel=1e-12)
    # Chunks of the per-token path add up to the whole (Note [Chunked loss]).
    chunks = float(token_loss_sum("negative", "unlikelihood", logp[:2])) + float(
        token_loss_sum("negative", "unlikelihood", logp[2:]))
    assert chunks == pytest.approx(sum(terms), rel=1e-12)


def test_unlikelihood_stays_finite_at_probability_one() -> None:
    logp = torch.zeros(2, dtype=torch.float32)  # p = 1: the clamp at 1 - 1e-6 keeps it finite
    assert math.isfinite(float(sample_loss("negative", "unlikelihood", logp)))
    assert math.isfinite(float(token_loss_sum("negative", "unlikelihood", logp)))


@pytest.mark.parametrize("kl", [0.0, 0.3, -0.2])
def test_kto_loss_and_its_ratio_derivative_match_the_hand_value(kl: float) -> None:
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.25], dtype=torch.float64)  # summed log ratio r = 0.75
    ratio = 0.75
    want = _hand_kto(ratio, kl)
    assert float(kto_negative_loss(logp, ref, kl)) == pytest.approx(want, rel=1e-12)
    assert float(sample_loss("negative", "kto", logp, ref, kl_estimate=kl)) == pytest.approx(want, rel=1e-12)
    loss, coef = kto_loss_and_coefficient(torch.tensor(ratio, dtype=torch.float64), kl)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    h = 1e-6  # central finite difference of the hand formula
    slope = (_hand_kto(ratio + h, kl) - _hand_kto(ratio - h, kl)) / (2 * h)
    assert float(coef) == pytest.approx(slope, rel=1e-6)


def test_kto_whole_sample_gradient_equals_the_units_coefficient_per_token() -> None:
    """The work units' chunk loss dL/dr * sum(logp) has KTO's gradient: every log-prob gets dL/dr."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.2, -1.9, -0.9], dtype=torch.float64)
    kto_negative_loss(logp, ref, 0.1).backward()
    ratio = float((logp.detach() - ref).sum())
    h = 1e-6
    slope = (_hand_kto(ratio + h, 0.1) - _hand_kto(ratio - h, 0.1)) / (2 * h)
    assert logp.grad is not None
    assert logp.grad.tolist() == pytest.approx([slope] * 3, rel=1e-6)
