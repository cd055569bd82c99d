"""Demotion keeps replay exact on what remains (store/index.py, Note [Demote before evict]).

A prompt's real recording (HF transformers prefill of the tiny model, the independent reference of
tests/support/hfref.py) goes through the real store write path; filler prompts then force demotion of
its oldest pages. The sample planned from the store's segments must replay ``down`` on the demoted
pages and all four projections on the page still full, and its loss and LoRA gradients must equal
the recompute ones (replay off) and the HF + PEFT reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.train import PromptSegment, Recording, ReplayTrainer, Sample, load_fused_weights
from tests.support.hfref import (adapter_grads, build_hf_peft, hf_grads, hf_record,
                                 max_rel_err, model_dir, random_adapter)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)
PAGE = 16
NS = Namespace("v0")
TOL = 1e-5


def _record(store: ActivationStore, rid: str, prompt: torch.Tensor, rec: dict) -> None:
    """One extend forward of the whole prompt through the store's real write path."""
    tokens = [int(t) for t in prompt]
    batch = store.open_batch([RequestExtend(rid, NS, tokens, 0, len(tokens), 0)])
    for name in store.plan.tensors:
        for layer in range(store.plan.shape.layers):
            store.write(batch, name, layer, rec[name][layer])
    store.close_batch(batch)


def _grads(trainer: ReplayTrainer, sample: Sample, replay: bool):
    trainer.config = TrainConfig(lora=trainer.config.lora, replay=replay)
    trainer.adapter.zero_grad(set_to_none=True)
    loss, counts, _ = trainer.accumulate([sample])
    return loss, {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()}, counts


@pytest.mark.parametrize("fillers", [1, 2])
def test_demoted_pages_replay_down_exactly_and_recompute_the_rest(fillers: int) -> None:
    weights = load_fused_weights(model_dir("tiny"))
    adapter = random_adapter(weights.spec, rank=4)
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(10, 40000, (2 * PAGE + 8,), generator=gen)  # two pages and a tail
    response = torch.randint(10, 40000, (9,), generator=gen)

    shape = ModelShape.from_hf_config(peft_model.config, 4)
    plan = choose_plan(shape, "full", page_tokens=PAGE)
    store = ActivationStore(plan, host_bytes=3 * plan.slot_bytes, dtype=torch.float32)
    _record(store, "sample", prompt, hf_record(peft_model, prompt))
    for i in range(fillers):  # each needs a slot: the sample's oldest pages are demoted
        filler = torch.randint(10, 40000, (PAGE,), generator=gen)
        _record(store, f"filler{i}", filler, hf_record(peft_model, filler))
    demoted = {1: 2, 2: 3}[fillers]  # 3 slots: the first filler opens a container
    assert store.status()["demotions"] == demoted and store.status()["evictions"] == 0

    pin = store.pin([int(t) for t in prompt], NS)
    segments = store.segments(pin)
    store.unpin(pin)
    sample = Sample(prompt, response, tuple(
        PromptSegment(s, e, None if t is None else Recording(0, t)) for s, e, t in segments))

    trainer = ReplayTrainer(weights, TrainConfig(lora=LoraConfig(rank=4, alpha=adapter.alpha)))
    trainer.adapter = adapter
    planned = trainer.plan(sample)
    replayed = [(seg.start, seg.end, tuple(sorted(seg.replay))) for seg in planned.segments
                if seg.replay]
    full = tuple(sorted(plan.tensors))
    want = ([(0, 2 * PAGE, ("down",)), (2 * PAGE, 2 * PAGE + 8, full)] if fillers == 1
            else [(0, 2 * PAGE + 8, ("down",))])
    assert replayed == want
    assert planned.counts.replayed_tokens == prompt.numel()

    loss_r, grads_r, counts_r = _grads(trainer, sample, replay=True)
    loss_c, grads_c, counts_c = _grads(trainer, sample, replay=False)
    assert (counts_r.replayed_tokens, counts_c.replayed_tokens) == (prompt.numel(), 0)
    assert abs(loss_r - loss_c) <= TOL * abs(loss_c)
    assert max_rel_err(grads_r, grads_c) <= TOL
    ref_loss, ref_grads = hf_grads(peft_model, [(prompt, response, 1.0)])
    assert abs(loss_r - ref_loss) <= 1e-4 * abs(ref_loss)
    assert max_rel_err(grads_r, ref_grads) <= 1e-4
