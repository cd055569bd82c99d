"""train/graph_backward.py: the hand-written layer backward from recordings equals autograd.

The reference is torch autograd through train/layer.py's ``_core`` (the eager joint layer the
trainer runs) over all rows of the sample; the recording is taken from that same code
(tests/support/graph_record.py). fp32, tiny shapes: the real tiny Llama (GQA, 4 heads over 2)
and synthetic layers (MHA; groups of 3 as SmolLM2). Bar: norm-wise relative error <= 1e-5 for
the input gradient and every LoRA A/B gradient; in bf16, at most 2x bf16 autograd's own error.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alchemist_sgl.train import layer as layer_mod
from alchemist_sgl.train.graph_backward import GraphRecording, layer_backward
from alchemist_sgl.train.layer import LayerShape, lora_tensors
from alchemist_sgl.train.lora import FrozenLora
from alchemist_sgl.train.ops import RopeCache
from alchemist_sgl.train.spec import ALL_TARGETS, PROJECTIONS, LlamaSpec
from alchemist_sgl.train.weights import LayerWeights, load_fused_weights
from tests.support.graph_record import NO_RECS, graph_lora, record_layer, response_rows
from tests.support.hfref import model_dir, random_adapter
from tests.support.shapes import SMOLLM2_HF

TOL = 1e-5
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_weights():
    return load_fused_weights(model_dir("tiny"))


def _synthetic(heads: int, kv_heads: int, head_dim: int = 8, hidden: int = 40,
               inter: int = 56) -> tuple[LlamaSpec, LayerWeights]:
    spec = LlamaSpec(vocab=10, hidden=hidden, layers=1, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, intermediate=inter, rms_norm_eps=1e-6, rope_theta=1e4)
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)

    def w(*shape: int, s: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    lw = LayerWeights(qkv=w(spec.out_dim("qkv"), hidden), o=w(hidden, spec.q_size),
                      gate_up=w(2 * inter, hidden), down=w(hidden, inter),
                      input_layernorm=1 + w(hidden), post_attention_layernorm=1 + w(hidden))
    return spec, lw


def _case(spec, lw, layer, targets=ALL_TARGETS, form="plain"):
    adapter = random_adapter(spec, rank=4, targets=targets, seed=layer + 3)
    published = None
    if form != "plain":
        pub = random_adapter(spec, rank=4, targets=targets, seed=layer + 9)
        published = FrozenLora(spec, 4, pub.alpha, targets, dict(pub.a), dict(pub.b))
    parts, lt = lora_tensors(adapter, published, layer, form == "lag0")
    s = LayerShape(spec.rms_norm_eps, spec.heads, spec.kv_heads, spec.head_dim, spec.q_size,
                   spec.kv_size, spec.intermediate, rank=4, scale=adapter.scale, parts=parts,
                   is_lag0=form == "lag0", has_published=form == "published",
                   is_gqa=spec.kv_heads != spec.heads)
    return adapter, s, lt


def _inputs(spec, total, has_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(total, spec.hidden, generator=g)
    residual = torch.randn(total, spec.hidden, generator=g) if has_residual else None
    gh, gr = (torch.randn(total, spec.hidden, generator=g) for _ in range(2))
    return hidden, residual, gh, gr


def _grads(adapter):
    return {k: p.grad.clone() for k, p in {**{f"a{k}": v for k, v in adapter.a.items()},
                                           **{f"b{k}": v for k, v in adapter.b.items()}}.items()
            if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(s, lw, adapter, lt, rope, hidden, residual, gh, gr):
    """Autograd through layer.py's _core over all rows: (d hidden, d residual, LoRA grads)."""
    adapter.zero_grad(set_to_none=True)
    h = hidden.clone().requires_grad_()
    r = residual.clone().requires_grad_() if residual is not None else None
    cos, sin = rope.get(0, h.shape[0])
    out_h, out_r = layer_mod._core(s, h, r, lw.input_layernorm, lw.post_attention_layernorm,
                                   lw.qkv, lw.o, lw.gate_up, lw.down, cos, sin, NO_RECS, lt)
    ((out_h * gh).sum() + (out_r * gr).sum()).backward()
    return h.grad, (r.grad if r is not None else None), _grads(adapter)


def _graph(s, lw, adapter, lt, rope, hidden, residual, gh, gr, p_len, layer, block_rows=7):
    """Prompt rows [0, p_len) through the graph backward, the rest through autograd:
    (d input of the prompt rows, d hidden and d residual of the rest, LoRA grads summed)."""
    adapter.zero_grad(set_to_none=True)
    total = hidden.shape[0]
    cos, sin = rope.get(0, p_len)
    res_p = residual[:p_len] if residual is not None else None
    rec, _ = record_layer(s, lw, hidden[:p_len], res_p, cos, sin, lt)
    rest, dk_extra, dv_extra = (None, None), None, None
    if p_len < total:
        k_prev, v_prev = rec.k.clone().requires_grad_(), rec.v.clone().requires_grad_()
        h = hidden[p_len:].clone().requires_grad_()
        r = residual[p_len:].clone().requires_grad_() if residual is not None else None
        cr, sr = rope.get(p_len, total)
        out_h, out_r = response_rows(s, lw, h, r, cr, sr, lt, k_prev, v_prev)
        ((out_h * gh[p_len:]).sum() + (out_r * gr[p_len:]).sum()).backward()
        rest = (h.grad, r.grad if r is not None else None)
        dk_extra, dv_extra = k_prev.grad, v_prev.grad
    with torch.no_grad():
        out = layer_backward(rec, lw, graph_lora(s, lt), cos, sin, gh[:p_len], gr[:p_len],
                             dk_extra=dk_extra, dv_extra=dv_extra, block_rows=block_rows)
    grads = _grads(adapter)
    for k, proj in enumerate(PROJECTIONS):
        for (t, _, _), da, db in zip(adapter.pairs(layer, proj), out.da[k], out.db[k]):
            for key, g in ((f"a{layer}_{t}", da), (f"b{layer}_{t}", db)):
                grads[key] = grads[key] + g if key in grads else g
    return out.d_input, rest, grads


def _check(ref, ours, p_len):
    ref_h, ref_r, ref_grads = ref
    d_prompt, (rest_h, rest_r), grads = ours
    assert _rel(d_prompt, ref_h[:p_len]) <= TOL
    if ref_r is not None:
        assert _rel(d_prompt, ref_r[:p_len]) <= TOL  # s1 = h + r: one gradient for both
    if rest_h is not None:
        assert _rel(rest_h, ref_h[p_len:]) <= TOL
        if ref_r is not None:
            assert _rel(rest_r, ref_r[p_len:]) <= TOL
    assert set(grads) == set(ref_grads) and ref_grads
    for key, g in ref_grads.items():
        assert g.norm() > 0, key
        assert _rel(grads[key], g) <= TOL, key


def _run(spec, lw, layer, total, p_len, has_residual, targets=ALL_TARGETS, form="plain",
         block_rows=7):
    adapter, s, lt = _case(spec, lw, layer, targets, form)
    rope = RopeCache(spec.head_dim, spec.rope_theta, torch.float32, "cpu")
    args = (s, lw, adapter, lt, rope, *_inputs(spec, total, has_residual, seed=total + p_len))
    _check(_reference(*args), _graph(*args, p_len, layer, block_rows), p_len)


@pytest.mark.parametrize("has_residual", [True, False])
def test_all_rows_recorded_tiny_llama(tiny_weights, has_residual):
    """(a) the whole sequence recorded, no later rows; the real tiny Llama (GQA 4/2); layer 0
    (no residual: the embedding is s1) and a middle layer."""
    layer = 1 if has_residual else 0
    _run(tiny_weights.spec, tiny_weights.layers[layer], layer, 19, 19, has_residual)


@pytest.mark.parametrize("p_len", [1, 12, 18])
def test_prompt_rows_then_response_rows(tiny_weights, p_len):
    """(b) prompt rows by the graph backward, response rows by autograd with dk/dv extra."""
    _run(tiny_weights.spec, tiny_weights.layers[2], 2, 19, p_len, True)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("p_len", [11, 16])
def test_gqa_and_mha(heads, kv_heads, p_len):
    """(c) kv_heads < heads (groups of 2 in the tiny Llama above, 3 here as SmolLM2) and MHA."""
    spec, lw = _synthetic(heads, kv_heads)
    _run(spec, lw, 0, 16, p_len, True, block_rows=4)


@pytest.mark.parametrize("targets", [ALL_TARGETS, ("q", "v"), ("k", "o", "up"), ("gate", "down")])
def test_lora_targets(tiny_weights, targets):
    """(d) LoRA on all targets and on subsets."""
    _run(tiny_weights.spec, tiny_weights.layers[3], 3, 17, 13, True, targets=targets)


def test_without_lora(tiny_weights):
    """No LoRA: only the input gradient, equal to autograd's."""
    spec, lw = tiny_weights.spec, tiny_weights.layers[3]
    _, s, lt = _case(spec, lw, 3)
    s = LayerShape(**{**s.__dict__, "parts": ((), (), (), ())})
    assert graph_lora(s, lt) is None
    rope = RopeCache(spec.head_dim, spec.rope_theta, torch.float32, "cpu")
    hidden, residual, gh, gr = _inputs(spec, 10, True)
    h = hidden.clone().requires_grad_()
    cos, sin = rope.get(0, 10)
    out_h, out_r = layer_mod._core(s, h, residual, lw.input_layernorm, lw.post_attention_layernorm,
                                   lw.qkv, lw.o, lw.gate_up, lw.down, cos, sin, NO_RECS, lt)
    ((out_h * gh).sum() + (out_r * gr).sum()).backward()
    rec, _ = record_layer(s, lw, hidden, residual, cos, sin, lt)
    out = layer_backward(rec, lw, None, cos, sin, gh, gr)
    assert _rel(out.d_input, h.grad) <= TOL and out.da == ((),) * 4


@pytest.mark.parametrize("form", ["published", "lag0"])
def test_published_forms(tiny_weights, form):
    """forward.py, Note [Published adapter]: the full form (minus the published pairs' term) and
    the lag-0 form (no LoRA term in the input gradient)."""
    _run(tiny_weights.spec, tiny_weights.layers[1], 1, 15, 9, True, form=form)


class _Products(TorchDispatchMode):
    """Every matrix product and attention kernel dispatched inside the block, with whether one of
    its operands is a base weight transposed (x W^T: a projection's forward) or as stored
    (dy W: its input-gradient backward)."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {w.data_ptr(): w.stride() for w in weights}
        self.forward_projections = 0
        self.backward_projections = 0
        self.attention_kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "scaled_dot_product" in name or "flash" in name:
            self.attention_kernels += 1
        if name.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm"):
            for t in args:
                if isinstance(t, torch.Tensor) and t.data_ptr() in self.ptrs:
                    if t.stride() == self.ptrs[t.data_ptr()]:
                        self.backward_projections += 1
                    else:
                        self.forward_projections += 1
        return func(*args, **(kwargs or {}))


def test_runs_no_forward_op(tiny_weights):
    """The graph backward runs no base projection forward and no attention kernel: one dy W per
    projection. The same detector sees the four forwards in autograd's path (so it can fail)."""
    spec, lw = tiny_weights.spec, tiny_weights.layers[1]
    adapter, s, lt = _case(spec, lw, 1)
    rope = RopeCache(spec.head_dim, spec.rope_theta, torch.float32, "cpu")
    hidden, residual, gh, gr = _inputs(spec, 12, True)
    cos, sin = rope.get(0, 12)
    rec, _ = record_layer(s, lw, hidden, residual, cos, sin, lt)
    base = [lw.qkv, lw.o, lw.gate_up, lw.down]
    with torch.no_grad(), _Products(base) as ours:
        layer_backward(rec, lw, graph_lora(s, lt), cos, sin, gh, gr, block_rows=5)
    assert (ours.forward_projections, ours.attention_kernels) == (0, 0)
    assert ours.backward_projections == 4
    h = hidden.clone().requires_grad_()
    with _Products(base) as autograd_path:
        out_h, out_r = layer_mod._core(s, h, residual, lw.input_layernorm,
                                       lw.post_attention_layernorm, lw.qkv, lw.o, lw.gate_up,
                                       lw.down, cos, sin, NO_RECS, lt)
        ((out_h * gh).sum() + (out_r * gr).sum()).backward()
    assert autograd_path.forward_projections == 4 and autograd_path.attention_kernels >= 1


def test_bytes_per_token_smollm2():
    """The recording's size: 2H + 2 q_size + 2 kv_size + 2F elements in the compute dtype plus
    2 + heads fp32 statistics per token and layer."""
    spec = LlamaSpec.from_hf_config({**SMOLLM2_HF, "vocab_size": 49152})
    elems = 2 * 576 + 2 * 576 + 2 * 192 + 2 * 1536
    assert GraphRecording.bytes_per_token(spec, 4) == elems * 4 + (2 + 9) * 4 == 23084
    assert GraphRecording.bytes_per_token(spec, 2) == elems * 2 + (2 + 9) * 4 == 11564


def test_bf16_within_twice_autograds_own_error(tiny_weights):
    """bf16 (recording, weights and products; LoRA master tensors fp32): the graph backward's
    error against the fp32 autograd reference is at most 2x bf16 autograd's own (the
    bf16 bar, here for one layer, prompt rows + response rows)."""
    spec, lw32 = tiny_weights.spec, tiny_weights.layers[2]
    lw16 = LayerWeights(**{k: v.to(torch.bfloat16) for k, v in lw32.__dict__.items()})
    adapter, s, lt = _case(spec, lw32, 2)
    hidden, residual, gh, gr = _inputs(spec, 40, True)
    rope32 = RopeCache(spec.head_dim, spec.rope_theta, torch.float32, "cpu")
    rope16 = RopeCache(spec.head_dim, spec.rope_theta, torch.bfloat16, "cpu")
    ref_h, _, ref_grads = _reference(s, lw32, adapter, lt, rope32, hidden, residual, gh, gr)
    bf = [t.to(torch.bfloat16) for t in (hidden, residual, gh, gr)]
    auto_h, _, auto_grads = _reference(s, lw16, adapter, lt, rope16, *bf)
    ours_p, (ours_rest, _), ours_grads = _graph(s, lw16, adapter, lt, rope16, *bf, 30, 2, 16)

    def err(d_input, grads):
        return max([_rel(d_input.float(), ref_h)]
                   + [_rel(grads[k].float(), g) for k, g in ref_grads.items()])

    own = err(auto_h, auto_grads)
    assert 0 < own < 0.05
    assert err(torch.cat([ours_p, ours_rest]), ours_grads) <= 2 * own
