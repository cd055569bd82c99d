"""The compiled layer (layer.py, Note [Compiled layer]) and its warm-up (warmup.py) against the
eager joint layer: the same unit-by-unit step, in both LoRA forms, with the prompt replayed and
recomputed. One test module pays the compile (tiny model, four graphs); the rest of the suite
runs eager (``train.compile`` is off in the test configs)."""

from __future__ import annotations

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.train import ReplayTrainer, load_fused_weights
from alchemist_sgl.train.warmup import warm_up_compiled
from tests.support.layer_calls import layer_calls
from tests.support.hfref import (adapter_grads, build_hf_peft, max_rel_err, model_dir,
                                 random_adapter)
from tests.support.store_rig import store_samples as _store_samples
from tests.support.store_rig import stored_samples  # noqa: F401 (fixture)
from tests.support.hfref import CASES, build_samples

TOL = 1e-5  # compiled vs eager, fp32 (inductor may reorder reductions)


def _trainer(weights, adapter, is_compiled: bool) -> ReplayTrainer:
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), learning_rate=5e-3, compile=is_compiled)
    trainer = ReplayTrainer(weights, cfg)
    trainer.adapter.load_state_dict(adapter.state_dict())
    return trainer


def _step_grads(trainer: ReplayTrainer, samples):
    run = trainer.begin_step(samples)
    while run.units < run.units_total - 1:
        run.run_unit()
    grads = {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()}
    run.run_unit()
    return run.loss, grads


@pytest.fixture(scope="module")
def compiled_pair():
    torch.set_num_threads(1)
    weights = load_fused_weights(model_dir("tiny"))
    adapter = random_adapter(weights.spec, rank=4, seed=20)
    compiled = _trainer(weights, adapter, True)
    before = {k: v.clone() for k, v in compiled.adapter.state_dict().items()}
    info = warm_up_compiled(compiled, is_frozen=False)
    return weights, adapter, compiled, before, info


def test_warm_up_compiles_and_leaves_the_trainer_as_it_was(compiled_pair):
    weights, adapter, compiled, before, info = compiled_pair
    assert info["steps"] == 4
    after = compiled.adapter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not compiled.optimizer.state and compiled.published is None
    assert compiled.counters.steps == 0
    assert all(p.grad is None for p in compiled.adapter.parameters())
    assert _trainer(weights, adapter, False).is_compiled is False


@pytest.mark.parametrize("form", ["plain", "lag0", "full"])
def test_compiled_step_matches_eager(compiled_pair, form):
    weights, adapter, compiled, _, _ = compiled_pair
    samples, _ = build_samples(CASES["full_varied_lengths"][:2] + CASES["partial_coverage_prefix"],
                        build_hf_peft(model_dir("tiny"), torch.float32, adapter))
    eager = _trainer(weights, adapter, False)
    compiled.adapter.load_state_dict(adapter.state_dict())
    compiled.optimizer.state.clear()
    for t in (eager, compiled):
        if form != "plain":  # published = the adapter itself (lag 0) or forced full form
            t.set_published(t.adapter.snapshot(), allow_lag0_form=form == "lag0")
    with layer_calls() as calls:
        loss_e, grads_e = _step_grads(eager, samples)
        loss_c, grads_c = _step_grads(compiled, samples)
    n_compiled = calls["compiled"]
    # every layer but layer 0 of every sample ran compiled (Note [Compiled layer])
    assert n_compiled == len(samples) * (weights.spec.layers - 1)
    assert abs(loss_c - loss_e) <= TOL * abs(loss_e)
    assert max_rel_err(grads_c, grads_e) <= TOL
    compiled.set_published(None)


def test_compiled_step_reads_lazy_recordings(compiled_pair, stored_samples):
    """Recordings read a layer at a time from the store (store/readout.py, Note [Per-layer
    read-out]) through the compiled layer equal copied recordings through the eager one."""
    weights, _, compiled, _, _ = compiled_pair
    _, adapter, store, pairs = stored_samples
    eager = _trainer(weights, adapter, False)
    compiled.adapter.load_state_dict(adapter.state_dict())
    compiled.optimizer.state.clear()
    lazy, pins_l = _store_samples(store, pairs, is_lazy=True)
    copied, pins_c = _store_samples(store, pairs, is_lazy=False)
    with layer_calls() as calls:
        loss_c, grads_c = _step_grads(compiled, lazy)
    n_compiled = calls["compiled"]
    loss_e, grads_e = _step_grads(eager, copied)
    for pin in pins_l + pins_c:
        store.unpin(pin)
    # the fully recorded prompt ran compiled past layer 0; the one with a hole runs eager
    assert n_compiled == weights.spec.layers - 1
    assert abs(loss_c - loss_e) <= TOL * abs(loss_e)
    assert max_rel_err(grads_c, grads_e) <= TOL
