"""core/plan.py: the full default, named plans, greedy choice by FLOPs per byte, the kept tensor,
bytes per token, FLOPs avoided."""

from __future__ import annotations

import pytest

from alchemist_sgl.errors import ConfigError
from alchemist_sgl.core.plan import ModelShape, choose_plan, forward_flops_per_token
from tests.support.shapes import LLAMA_1B_HF, SMOLLM2_HF



def smollm2(dtype_bytes: int = 2) -> ModelShape:
    return ModelShape.from_hf_config(SMOLLM2_HF, dtype_bytes)


def test_shape_from_hf_config() -> None:
    shape = smollm2()
    assert (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (576, 9, 3, 64)
    assert (shape.intermediate, shape.layers) == (1536, 30)


@pytest.mark.parametrize("hf", [SMOLLM2_HF, LLAMA_1B_HF])
def test_default_plan_is_full_for_every_size_and_keeps_down(hf: dict) -> None:
    shape = ModelShape.from_hf_config(hf, 2)
    plan = choose_plan(shape)
    assert plan.tensors == ("qkv", "o", "gate_up", "down")
    # down has the largest d_in (the intermediate width), so the most FLOPs per stored byte.
    assert plan.keep_on_demotion == "down"
    assert choose_plan(shape, "down").keep_on_demotion is None  # nothing left to drop


def test_named_plans_and_their_errors() -> None:
    shape = smollm2()
    assert choose_plan(shape, "down").tensors == ("down",)
    assert choose_plan(shape, ["down", "qkv"]).tensors == ("qkv", "down")  # layer order
    assert choose_plan(shape, ("o", "gate_up")).keep_on_demotion == "o"  # tie: fewer bytes
    for bad in ("most", [], ["down", "down"], ["down", "mlp"], True, None):
        with pytest.raises(ConfigError) as info:
            choose_plan(shape, bad)  # type: ignore[arg-type]
        assert info.value.key == "record.plan"


def test_40kb_budget_picks_down_proj_only() -> None:
    plan = choose_plan(smollm2(), 40_000)
    assert plan.tensors == ("down",)
    assert plan.bytes_per_token == 30 * 576 * 2 == 34_560  # ~34.6 KB/token in bf16
    assert plan.widths == {"down": 576}


def test_full_plan_bytes_smollm2_bf16() -> None:
    plan = choose_plan(smollm2(), "full")
    assert plan.tensors == ("qkv", "o", "gate_up", "down")
    assert plan.widths == {"qkv": 960, "o": 576, "gate_up": 3072, "down": 576}
    assert plan.bytes_per_token == 311_040  # ~311 KB/token
    assert plan.slot_bytes == 16 * 311_040


def test_greedy_order_and_skip_when_not_fitting() -> None:
    shape = smollm2()
    assert choose_plan(shape, 0).tensors == ()
    assert choose_plan(shape, 34_559).tensors == ()
    # After down, the ties (2 x 576 FLOPs/element) go fewest bytes first: o (34,560) before
    # qkv (57,600) before gate_up (184,320); gate_up is skipped when it does not fit.
    assert choose_plan(shape, 2 * 34_560).tensors == ("o", "down")
    assert choose_plan(shape, 2 * 34_560 + 57_600).tensors == ("qkv", "o", "down")
    assert choose_plan(shape, 311_040).tensors == ("qkv", "o", "gate_up", "down")


def test_bad_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        choose_plan(smollm2(), -1)
    assert info.value.key == "record.budget_bytes_per_token"


def test_flops_avoided_fraction() -> None:
    shape = smollm2()
    down = choose_plan(shape, 40_000)
    full = choose_plan(shape, "full")
    # down_proj is 25% of projection FLOPs; the forward also has attention and elementwise ops.
    assert 0.20 < down.prompt_forward_flops_avoided(16) < 0.25
    assert full.prompt_forward_flops_avoided(16) < 1.0
    # Attention grows with context: the fraction avoided shrinks.
    assert full.prompt_forward_flops_avoided(4096) < full.prompt_forward_flops_avoided(410)
    # Hand count for SmolLM2 (hidden 576, 9 heads, 3 KV heads, head_dim 64, intermediate 1536),
    # per token and layer, at a 410-token prompt (mean causal span 411 / 2 = 205.5):
    #   projections 2 * (576*960 + 576*576 + 576*3072 + 1536*576)  = 7,077,888
    #   attention   2 * 2 * 9 * 64 * 205.5 (QK^T and AV)            =   473,472
    #   RoPE 6 * (9 + 3) * 64 = 4,608; SiLU*mul 5 * 1536 = 7,680; norms and adds 10 * 576 = 5,760
    #   total 7,569,408; full plan saves the projections: 7,077,888 / 7,569,408 = 0.935065
    #   down alone saves 2 * 1536 * 576 = 1,769,472: 0.233766
    assert forward_flops_per_token(shape, 410) == pytest.approx(30 * 7_569_408)
    assert full.prompt_forward_flops_avoided(410) == pytest.approx(0.935065, abs=1e-6)
    assert down.prompt_forward_flops_avoided(410) == pytest.approx(0.233766, abs=1e-6)
    assert choose_plan(shape, 0).prompt_forward_flops_avoided() == 0.0
    status = full.as_status()
    assert status["tensors"] == ["qkv", "o", "gate_up", "down"]
    assert status["bytes_per_token"] == 311_040
    assert status["prompt_forward_flops_avoided"] == 0.9351  # the 410-token hand count, rounded


def test_graph_plan_sizes_and_flops() -> None:
    """graph = the four projections + attn (heads * head_dim, model dtype) + lse (heads, fp32,
    stored bit-cast in the model dtype); bytes by hand for SmolLM2 in bf16 and fp32."""
    bf16 = choose_plan(smollm2(2), "graph")
    assert bf16.tensors == ("qkv", "o", "gate_up", "down", "attn", "lse")
    assert bf16.is_graph and bf16.projections == ("qkv", "o", "gate_up", "down")
    assert not choose_plan(smollm2(2), "full").is_graph
    assert bf16.widths == {"qkv": 960, "o": 576, "gate_up": 3072, "down": 576, "attn": 576,
                           "lse": 18}  # 9 fp32 heads = 36 bytes = 18 bf16 storage elements
    # per layer: 5184 projection elements + 576 attn in bf16 (11,520 B) + 9 fp32 (36 B)
    assert bf16.bytes_per_token == 30 * (5760 * 2 + 9 * 4) == 346_680
    assert bf16.slot_bytes == 16 * 346_680
    fp32 = choose_plan(smollm2(4), "graph")
    assert fp32.widths["lse"] == 9
    assert fp32.bytes_per_token == 30 * (5760 + 9) * 4
    assert bf16.keep_on_demotion == "down"  # graph pages demote to down, like full ones
    # Note [What replay never saves]: a graph-recorded prompt row runs no forward op.
    assert bf16.prompt_forward_flops_avoided(410) == 1.0
    assert bf16.prompt_forward_flops_avoided(4096) == 1.0
    assert bf16.as_status() == {"tensors": ["qkv", "o", "gate_up", "down", "attn", "lse"],
                                "bytes_per_token": 346_680, "prompt_forward_flops_avoided": 1.0}


@pytest.mark.parametrize("bad", [["attn"], ["down", "lse"], "lse", "graph_"])
def test_graph_extras_only_come_with_the_graph_plan(bad) -> None:
    with pytest.raises(ConfigError):
        choose_plan(smollm2(), bad)
