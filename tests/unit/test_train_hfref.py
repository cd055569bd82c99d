"""Tests of the independent reference's helpers (tests/support/hfref.py over eval/hf_reference.py):
the HF recordings have SGLang's fused layout and values, and the gradient comparison flags
missing and wrong tensors."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from tests.support.hfref import build_hf_peft, hf_record, max_rel_err, model_dir, random_adapter

torch.set_num_threads(1)


def test_hf_recording_shapes_match_fused_layout():
    from alchemist_sgl.train import load_fused_weights
    weights = load_fused_weights(model_dir("tiny"))
    spec = weights.spec
    adapter = random_adapter(spec)
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    prompt = torch.arange(5, 17)
    rec = hf_record(peft_model, prompt)
    for name in ("qkv", "o", "gate_up", "down"):
        assert rec[name].shape == (spec.layers, 12, spec.out_dim(name))
    # Layer 0 qkv is the base projection of the normalised embedding: check it from the weights.
    emb = weights.embed[prompt]
    normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
    normed = normed * weights.layers[0].input_layernorm
    torch.testing.assert_close(rec["qkv"][0], normed @ weights.layers[0].qkv.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_max_rel_err_flags_missing_and_wrong(dtype):
    ref = {"a": torch.ones(3, dtype=dtype)}
    assert max_rel_err({"a": torch.ones(3)}, ref) == 0.0
    assert max_rel_err({}, ref) == float("inf")
    assert max_rel_err({"a": torch.zeros(3)}, ref) == pytest.approx(1.0)


def test_expected_merge_agrees_with_peft_merge_and_unload():
    """The rig's written-out W0 + s * B @ A (tests/support/loop_rig.py, what the online-loop tests
    expect the served weights to be) against PEFT's own merge of the same adapter."""
    from alchemist_sgl.train import load_fused_weights
    from tests.support.loop_rig import expected_merge, live_tensors

    weights = load_fused_weights(model_dir("tiny"))
    adapter = random_adapter(weights.spec, rank=4, seed=5)
    want = expected_merge(live_tensors(weights), adapter.peft_state_dict(), adapter.alpha / adapter.rank,
                          model_dir("tiny") / "config.json")
    merged = build_hf_peft(model_dir("tiny"), torch.float32, adapter).merge_and_unload().state_dict()
    for i in range(weights.spec.layers):
        pre = f"model.layers.{i}."
        peft = {"qkv": torch.cat([merged[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
                "o": merged[pre + "self_attn.o_proj.weight"],
                "gate_up": torch.cat([merged[pre + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]),
                "down": merged[pre + "mlp.down_proj.weight"]}
        for proj, ref in peft.items():
            torch.testing.assert_close(want[(i, proj)], ref, rtol=1e-6, atol=1e-6)
            assert not torch.equal(want[(i, proj)], weights.layers[i].projection(proj))
