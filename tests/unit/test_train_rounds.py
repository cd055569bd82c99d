"""A round (train/rounds.py, Note [Round normalisation]) equals one batch over the same samples.

Real computations on the tiny Llama, no mocks: the same adapter, replayed and recomputed samples
with different weights (and a negative one), once as one batch and once as a round that takes
them one at a time. Against the batch step in work units (``begin_step``) the loss and every LoRA
gradient must agree to 1e-6 (fp32) and the optimizer step must land the same adapter; against the
independent whole-sample backward (``accumulate``, which scales each loss by w_i / sum(w) before
its backward) to the units' tolerance, 1e-5 (fp32 rounding through the chain of a different scale).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from alchemist_sgl.train import Sample
from tests.support.hfref import adapter_grads, build_hf_peft, max_rel_err, model_dir
from tests.support.hfref import CASES, build_samples, ids_of
from tests.support.units import make_trainer, run_to_optimizer, tiny  # noqa: F401 (fixture)

TOL = 1e-6
TOL_WHOLE = 1e-5

torch.set_num_threads(1)


def _samples(trained) -> list[Sample]:
    replayed, _ = build_samples(CASES["hole_in_middle"] + CASES["full_varied_lengths"],
                         build_hf_peft(model_dir("tiny"), torch.float32, trained))
    weighted = [Sample(s.prompt_ids, s.response_ids, s.segments, s.kind, w)
                for s, w in zip(replayed, (1.0, 0.5, 2.0, 0.25))]
    return weighted + [Sample(ids_of(7, 18), ids_of(8, 6), kind="negative", weight=1.5)]


def _round_grads(trainer, samples):
    run = trainer.begin_round()
    for s in samples:
        units = run.add(s)
        while not units.is_done:
            units.run_unit()
    grads = {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()}
    return run, grads


def test_a_round_equals_one_batch_of_the_same_samples(tiny) -> None:
    weights, _, trained = tiny
    samples = _samples(trained)
    batch_trainer = make_trainer(weights, trained, loss_chunk_rows=8)
    step = batch_trainer.begin_step(samples)
    run_to_optimizer(step)
    batch = {k: v * step.grad_scale for k, v in adapter_grads(batch_trainer.adapter).items()}
    step.run_unit()
    batch_stats = step.finish()

    round_trainer = make_trainer(weights, trained, loss_chunk_rows=8)
    run, summed = _round_grads(round_trainer, samples)
    weight_sum = sum(s.weight for s in samples)
    assert max_rel_err({k: v / weight_sum for k, v in summed.items()}, batch) <= TOL
    whole_trainer = make_trainer(weights, trained, loss_chunk_rows=8)
    whole_loss, _, _ = whole_trainer.accumulate(samples)
    whole = adapter_grads(whole_trainer.adapter)
    assert max_rel_err({k: v / weight_sum for k, v in summed.items()}, whole) <= TOL_WHOLE
    stats = run.close()
    assert stats.samples == len(samples) == batch_stats.samples
    assert stats.tokens == batch_stats.tokens
    assert stats.replayed_tokens == batch_stats.replayed_tokens > 0
    assert abs(stats.loss - batch_stats.loss) <= TOL * abs(batch_stats.loss)
    assert abs(stats.loss - whole_loss) <= TOL_WHOLE * abs(whole_loss)
    after_batch = batch_trainer.adapter.state_dict()
    after_round = round_trainer.adapter.state_dict()
    assert max(float((after_batch[k] - after_round[k]).abs().max()) for k in after_batch) <= 1e-6
    assert not any(p.grad is not None for p in round_trainer.adapter.parameters())


def test_a_round_refuses_to_close_empty_and_to_interleave_samples(tiny) -> None:
    weights, _, trained = tiny
    trainer = make_trainer(weights, trained)
    run = trainer.begin_round()
    with pytest.raises(ValueError, match="never closes empty"):
        run.close()
    units = run.add(Sample(ids_of(1, 10), ids_of(2, 4)))
    units.run_unit()
    with pytest.raises(RuntimeError, match="units left"):
        run.add(Sample(ids_of(3, 10), ids_of(4, 4)))
    with pytest.raises(RuntimeError, match="units left"):
        run.close()
    run.abandon()
    assert not any(p.grad is not None for p in trainer.adapter.parameters())
