"""Replay gradient equivalence against an independent reference (HF transformers + PEFT).

The bar (docs/recording-and-replay.md "The idea"): with the same weights, LoRA tensors and dtype, loss and every LoRA
gradient of the segment forward, replaying recordings captured from the HF model, equal the HF+PEFT
recompute: norm-wise relative error <= 1e-4 in fp32; in bf16 replay's error against the fp32
reference is at most 2x the bf16 recompute's own.
"""

from __future__ import annotations

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.train import ReplayTrainer, Sample, load_fused_weights
from tests.support.hfref import (CASES, adapter_grads, build_hf_peft, build_samples, covered_sample,
                                 hf_grads, hf_record, ids_of, max_rel_err, model_dir, random_adapter)
from tests.support.hfref import tiny  # noqa: F401 (fixture)

TOL_FP32 = 1e-4


def _trainer(weights, adapter, layout="segments", **train_kw) -> ReplayTrainer:
    cfg = TrainConfig(lora=LoraConfig(rank=adapter.rank, alpha=adapter.alpha), **train_kw)
    trainer = ReplayTrainer(weights, cfg, layout=layout)
    trainer.adapter = adapter
    return trainer


def _ours(trainer: ReplayTrainer, samples: list[Sample]):
    trainer.adapter.zero_grad(set_to_none=True)
    loss, counts, _ = trainer.accumulate(samples)
    return loss, {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()}, counts


@pytest.mark.parametrize("layout", ["segments", "joint"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_replay_matches_hf_peft_fp32(tiny, name, layout):
    weights, adapter, peft_model = tiny
    samples, ref = build_samples(CASES[name], peft_model)
    ref_loss, ref_grads = hf_grads(peft_model, ref)
    for replay in (True, False):
        loss, grads, counts = _ours(_trainer(weights, adapter, layout, replay=replay), samples)
        assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss), (replay, loss, ref_loss)
        assert max_rel_err(grads, ref_grads) <= TOL_FP32, replay
        covered = sum(e - s for (_, _, ranges, _) in CASES[name] for s, e, c in ranges if c)
        assert counts.replayed_tokens == (covered if replay else 0)


def test_shared_prefix_between_samples(tiny):
    """Two samples share a 24-token prefix recorded once (by the first prompt's prefill); the second
    replays that page range and recomputes its own suffix, as radix-cache dedup would give."""
    weights, adapter, peft_model = tiny
    shared = ids_of(100, 24)
    p1 = torch.cat([shared, ids_of(101, 16)])
    p2 = torch.cat([shared, ids_of(102, 9)])
    r1, r2 = ids_of(103, 8), ids_of(104, 12)
    rec1 = hf_record(peft_model, p1)
    s1 = covered_sample(p1, r1, [(0, 40, True)], rec1)
    s2 = covered_sample(p2, r2, [(0, 24, True), (24, 33, False)], rec1)  # prefix rows from p1
    ref_loss, ref_grads = hf_grads(peft_model, [(p1, r1, 1.0), (p2, r2, 1.0)])
    loss, grads, counts = _ours(_trainer(weights, adapter), [s1, s2])
    assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss)
    assert max_rel_err(grads, ref_grads) <= TOL_FP32
    assert counts.replayed_tokens == 64 and counts.recomputed_tokens == 9


def test_response_only_keeps_loss_and_is_replay_invariant(tiny):
    """Response-only mode (documented approximation): same loss as exact; its gradients are the same
    with or without replay, and differ from the exact ones (the prompt path is dropped)."""
    weights, adapter, peft_model = tiny
    samples, ref = build_samples(CASES["hole_in_middle"], peft_model)
    ref_loss, ref_grads = hf_grads(peft_model, ref)
    loss_r, grads_r, _ = _ours(_trainer(weights, adapter, gradient_mode="response_only"), samples)
    loss_c, grads_c, _ = _ours(_trainer(weights, adapter, gradient_mode="response_only",
                                        replay=False), samples)
    assert abs(loss_r - ref_loss) <= TOL_FP32 * abs(ref_loss)
    assert max_rel_err(grads_r, grads_c) <= TOL_FP32
    assert max_rel_err(grads_r, ref_grads) > 1e-2


def test_stale_recordings_fall_back_and_are_counted(tiny):
    weights, adapter, peft_model = tiny
    samples, ref = build_samples(CASES["hole_in_middle"], peft_model, version=3)
    ref_loss, ref_grads = hf_grads(peft_model, ref)
    trainer = _trainer(weights, adapter, max_version_lag=1)
    trainer.version = 5  # lag 2 > 1: both covered segments are recomputed
    loss, grads, counts = _ours(trainer, samples)
    assert counts.stale_recomputes == 2 and counts.replayed_tokens == 0
    assert counts.recomputed_tokens == 60
    assert max_rel_err(grads, ref_grads) <= TOL_FP32
    trainer.version = 4  # lag 1: reused, counted by lag (exact here: the weights did not change)
    _, grads, counts = _ours(trainer, samples)
    assert counts.reuse_by_lag == {1: 45} and counts.stale_recomputes == 0
    assert max_rel_err(grads, ref_grads) <= TOL_FP32


def test_recording_from_the_future_or_wrong_shape_is_refused(tiny):
    weights, adapter, peft_model = tiny
    samples, _ = build_samples(CASES["zero_coverage"][:1], peft_model)
    prompt, response = samples[0].prompt_ids, samples[0].response_ids
    rec = hf_record(peft_model, prompt)
    with pytest.raises(ValueError, match="newer"):
        _trainer(weights, adapter).plan(covered_sample(prompt, response, [(0, 30, True)], rec, version=1))
    bad = {"down": rec["down"][:, :, :7]}
    with pytest.raises(ValueError, match="expected"):
        _trainer(weights, adapter).plan(covered_sample(prompt, response, [(0, 30, True)], bad))
    with pytest.raises(ValueError, match="tile"):
        _trainer(weights, adapter).plan(covered_sample(prompt, response, [(0, 10, False), (12, 30, False)], rec))


def test_bf16_replay_error_within_twice_recompute_error():
    folder = model_dir("tiny")
    w32 = load_fused_weights(folder)
    a32 = random_adapter(w32.spec, rank=4)
    ref_model = build_hf_peft(folder, torch.float32, a32)
    w16 = load_fused_weights(folder, dtype=torch.bfloat16)
    a16 = random_adapter(w16.spec, rank=4, dtype=torch.bfloat16)
    with torch.no_grad():
        for p16, p32 in zip(a16.parameters(), a32.parameters()):
            p16.copy_(p32)
    hf16 = build_hf_peft(folder, torch.bfloat16, a16)
    case = CASES["hole_in_middle"] + CASES["full_varied_lengths"][:2]
    samples16, ref = build_samples(case, hf16)
    _, ref_grads = hf_grads(ref_model, ref)
    _, g_recompute, _ = _ours(_trainer(w16, a16, replay=False), samples16)
    err_recompute = max_rel_err(g_recompute, ref_grads)
    assert err_recompute < 0.2  # sanity: bf16 is close to fp32 at all
    for layout in ("segments", "joint"):
        _, g_replay, _ = _ours(_trainer(w16, a16, layout), samples16)
        err_replay = max_rel_err(g_replay, ref_grads)
        assert err_replay <= 2.0 * err_recompute, (layout, err_replay, err_recompute)


@pytest.mark.slow
def test_replay_matches_hf_peft_smollm2_fp32():
    folder = model_dir("smollm2-135m-instruct")
    weights = load_fused_weights(folder)
    adapter = random_adapter(weights.spec, rank=8)
    peft_model = build_hf_peft(folder, torch.float32, adapter)
    case = [(70, 12, [(0, 30, True), (30, 45, False), (45, 70, True)], None)]
    samples, ref = build_samples(case, peft_model)
    ref_loss, ref_grads = hf_grads(peft_model, ref)
    loss, grads, counts = _ours(_trainer(weights, adapter), samples)
    assert counts.replayed_tokens == 55
    assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss)
    assert max_rel_err(grads, ref_grads) <= TOL_FP32
    loss, grads, counts = _ours(_trainer(weights, adapter, "joint"), samples)
    assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss)
    assert max_rel_err(grads, ref_grads) <= TOL_FP32
