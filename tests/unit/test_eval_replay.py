"""The pure parts of the ``replay`` experiment: FLOPs shares, gradient comparisons, field assembly,
and the store round trip its timed replay arm goes through (tiny model shapes, real store)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math

import pytest
import torch

from alchemist_sgl.core.plan import ModelShape, TENSOR_ORDER, forward_flops_per_token
from eval.experiments import _replay_live as replay_live, _replay_metrics as m

torch.set_num_threads(1)
SMOL = ModelShape(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, layers=30, dtype_bytes=4)
TINY = ModelShape(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=192, layers=4, dtype_bytes=4)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _hand_flops(shape: ModelShape, p: int, r: int, tensors, vocab: int, rank: int) -> tuple[float, float]:
    """Independent arithmetic: projection matmuls written out per name."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dims = {"qkv": (shape.hidden, q + 2 * kv), "o": (q, shape.hidden),
            "gate_up": (shape.hidden, 2 * shape.intermediate), "down": (shape.intermediate, shape.hidden)}
    saved = shape.layers * sum(2 * dims[n][0] * dims[n][1] for n in tensors) * p
    lora_dims = [(shape.hidden, q), (shape.hidden, kv), (shape.hidden, kv), (q, shape.hidden),
                 (shape.hidden, shape.intermediate), (shape.hidden, shape.intermediate),
                 (shape.intermediate, shape.hidden)]
    lora = shape.layers * sum(2 * rank * (a + b) for a, b in lora_dims)
    total = (p + r) * (forward_flops_per_token(shape, p + r) + lora) + r * 2 * shape.hidden * vocab
    return saved, total


@pytest.mark.parametrize("tensors", [TENSOR_ORDER, ("down",), ("qkv", "gate_up")])
def test_flops_share_matches_hand_arithmetic(tensors) -> None:
    f, f_tokens = m.prompt_fractions(SMOL, tensors, [(400, 100, 400), (410, 100, 400)], 49152, 16, TARGETS)
    s1, t1 = _hand_flops(SMOL, 400, 100, tensors, 49152, 16)
    s2, t2 = _hand_flops(SMOL, 410, 100, tensors, 49152, 16)
    s2 = s2 * 400 / 410  # only 400 of that sample's 410 prompt tokens were replayed
    assert f == pytest.approx((s1 + s2) / (t1 + t2), rel=1e-12)
    assert f_tokens == pytest.approx(800 / 1010)
    assert 0 < f < f_tokens, "replay never removes attention, LoRA, LM head or response rows"


def test_flops_share_orders_plans_and_rejects_bad_sizes() -> None:
    full = m.prompt_fractions(SMOL, TENSOR_ORDER, [(400, 100, 400)], 49152, 16, TARGETS)[0]
    down = m.prompt_fractions(SMOL, ("down",), [(400, 100, 400)], 49152, 16, TARGETS)[0]
    assert 0 < down < full
    assert m.prompt_fractions(SMOL, (), [(400, 100, 400)], 49152, 16, TARGETS)[0] == 0.0
    with pytest.raises(ValueError):
        m.prompt_fractions(SMOL, TENSOR_ORDER, [(400, 100, 401)], 49152, 16, TARGETS)
    with pytest.raises(ValueError):
        m.lora_flops_per_token(SMOL, 16, ("nope",))


def test_cosine_and_relative_error() -> None:
    gen = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 4, generator=gen), "y": torch.randn(5, generator=gen)}
    flat = torch.cat([a["x"].reshape(-1), a["y"]]).double()
    b = {"x": -2 * a["x"], "y": torch.randn(5, generator=gen)}
    flat_b = torch.cat([b["x"].reshape(-1), b["y"]]).double()
    want = float(flat @ flat_b / (flat.norm() * flat_b.norm()))
    assert m.cosine(a, b) == pytest.approx(want, rel=1e-12)
    assert m.cosine(a, {k: 3 * v for k, v in a.items()}) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        m.cosine(a, {"x": a["x"]})
    ref = {"x": a["x"], "z": torch.zeros(2)}
    err, compared = m.max_rel_err({"x": a["x"] * 1.01, "z": torch.ones(2)}, ref)
    assert compared == 1 and err == pytest.approx(0.01, rel=1e-5)
    with pytest.raises(ValueError):
        m.max_rel_err({"z": torch.ones(2)}, ref)


def test_forward_seconds_from_bursts_and_ceiling() -> None:
    # two samples, three parameters: forward 0 -> 1.0, backward 1.0..1.2, forward 1.2 -> 2.0, ...
    events = [1.0, 1.1, 1.2, 2.0, 2.1, 2.2]
    assert m.forward_seconds(0.0, events, 2) == pytest.approx(1.0 + 0.8)
    with pytest.raises(ValueError):
        m.forward_seconds(0.0, events[:5], 2)
    # saving half the time on all rows, replay substitutes half the rows: 10 / (10 - 5 * 0.5)
    assert m.ceiling_ratios([10.0], [5.0], 0.5) == [pytest.approx(10 / 7.5)]
    assert m.ratio_stats([4.0, 6.0, 9.0], [2.0, 2.0, 3.0]) == (3.0, 1.0)


def test_plan_fields_assembly() -> None:
    times = {"replay": [1.0, 1.1, 0.9, 1.0, 1.2], "recompute": [2.0, 2.0, 2.0, 2.2, 2.4]}
    out = m.plan_fields(tokens=1000, times=times, forward_share=0.4, fractions=(0.5, 0.8),
                        ceiling=[1.5, 1.6, 1.4, 1.5, 1.5], errors=(1e-6, 2e-7), peak=(10, 20),
                        stale={8: 0.9, 1: 0.99, 2: 0.98, 4: 0.95})
    ratios = sorted(c / r for c, r in zip(times["recompute"], times["replay"]))
    assert out["ratio"] == pytest.approx(ratios[2])
    assert out["ratio_spread"] == pytest.approx(ratios[-1] - ratios[0])
    assert out["ideal_ratio"] == pytest.approx(1 / (1 - 0.4 * 0.5))
    assert out["tokens_per_s_replay"] == pytest.approx(1000 / 1.0)
    assert list(out["stale_grad_cos_by_lag"]) == ["1", "2", "4", "8"]
    assert out["repetitions"] == 5 and out["ceiling_ratio"] == 1.5


def test_store_round_trip_gives_the_exported_rows() -> None:
    """Exported segments written into an in-process store come back out through pin/segments as
    the same rows: what the timed replay arm reads equals what the server recorded."""
    gen = torch.Generator().manual_seed(1)
    prompt = list(range(100, 137))  # 37 tokens: two full pages and a tail
    widths = {"qkv": 128, "o": 64, "gate_up": 384, "down": 64}
    rows = {k: torch.randn(TINY.layers, 37, w, generator=gen) for k, w in widths.items()}
    export = {"tokens": prompt, "namespace": ["v0", None], "covered": [[0, 37]],
              "segments": [(0, 32, {k: v[:, :32] for k, v in rows.items()}),
                           (32, 37, {k: v[:, 32:] for k, v in rows.items()})]}
    store, ns = replay_live.fill_store([export], TINY, ("qkv", "down"), torch.float32)
    # no trainer: a projection plan's sample has no PromptGraph to rebuild
    sample, pin = replay_live.sample_from_store(store, ns, prompt, [5, 6], 3, None)
    assert sample.graph is None
    got = [s for s in sample.segments if s.recording is not None]
    assert sum(s.end - s.start for s in got) == 37 and sample.segments[0].start == 0
    for seg in got:
        assert seg.recording.version == 3 and set(seg.recording.tensors) == {"qkv", "down"}
        for k, t in seg.recording.tensors.items():  # read a layer at a time from the pages
            assert not isinstance(t, torch.Tensor) and t.shape == rows[k][:, seg.start:seg.end].shape
            assert torch.equal(t.materialize(), rows[k][:, seg.start:seg.end])
    store.unpin(pin)
    all_rows = replay_live.rows_of(export, ("o",))
    assert torch.equal(all_rows["o"], rows["o"])
    with pytest.raises(RuntimeError):
        replay_live.rows_of({**export, "segments": [(0, 37, None)]}, ("o",))
    assert math.isfinite(float(store.status()["bytes_stored"]))


def _smol_dims():
    from alchemist_sgl.train.spec import LlamaSpec  # noqa: F401 (the spec's field names)
    from eval.experiments import _replay_breakdown as bd

    class Spec:  # SmolLM2-135M's dims, as LlamaSpec names them
        hidden, heads, kv_heads, head_dim, intermediate, vocab = 576, 9, 3, 64, 1536, 49152
    return bd, bd.MatmulDims.from_spec(Spec, rank=16)


@pytest.mark.parametrize("shapes,kind", [
    ([[515, 576], [576, 960]], "projections"),       # qkv forward: x W^T
    ([[515, 960], [960, 576]], "projections"),       # qkv input gradient: g W
    ([[515, 1536], [1536, 576]], "projections"),     # down forward
    ([[100, 576], [576, 49152]], "projections"),     # LM head on the loss rows
    ([[515, 576], [515, 576], [576, 576]], "projections"),  # addmm (compiled): bias first
    ([[515, 576], [576, 48]], "lora"),               # x A^T, qkv's three A's stacked
    ([[515, 16], [16, 576]], "lora"),                # (x A^T) B^T
    ([[48, 515], [515, 576]], "lora"),               # grad of the stacked A's
    ([[576, 515], [515, 16]], "lora"),               # grad of B
    ([[515, 576], [576, 100]], None),                # neither
    ([[100, 576], [576, 3072], [100, 3072]], "projections"),  # mm into ``out`` rows
    ([[100, 1536], [1536, 576], [100, 576]], "projections"),  # not read as (576, 576): o's pair
    ([[100, 16], [16, 1536], [100, 1536]], "lora"),
])
def test_matmuls_are_told_apart_by_shape(shapes, kind) -> None:
    _, dims = _smol_dims()
    assert dims.matmul_kind(shapes) == kind


def test_operators_are_classified_by_name_shape_and_ancestors() -> None:
    bd, dims = _smol_dims()
    op = bd.OpRecord
    cases = [
        (op("aten::index_select", 1.0, (), ("alchemist::replay_readout", "_RowReplayed")), "gather"),
        (op("aten::copy_", 1.0, (), ("alchemist::replay_readout",)), "gather"),
        (op("aten::cat", 1.0, (), ("_PrefixReplayed",)), "gather"),
        (op("aten::cat", 1.0, (), ("_Rope",)), "pointwise"),          # not a replay copy
        (op("aten::copy_", 1.0, (), ()), "pointwise"),                # a cast or contiguous copy
        (op("aten::mm", 1.0, ((515, 576), (576, 3072)), ("_RowReplayed",)), "projections"),
        (op("aten::mm", 1.0, ((515, 3072), (3072, 576)), ("_RowReplayedBackward",)), "projections"),
        (op("aten::mm", 1.0, ((515, 576), (576, 32)), ()), "lora"),
        (op("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 1.0), "attention"),
        (op("aten::_softmax", 1.0), "attention"),
        (op("aten::silu_backward", 1.0), "pointwise"),
        (op("aten::add_", 1.0), "pointwise"),
        (op("aten::_to_copy", 1.0), "pointwise"),
        (op("## Call CompiledFxGraph abc ##", 1.0), "pointwise"),
        (op("aten::add_", 1.0, (), ("Optimizer.step#AdamW.step",)), "autograd_other"),
        (op("aten::add_", 1.0, (), ("torch::autograd::AccumulateGrad",)), "autograd_other"),
        (op("aten::_log_softmax", 1.0, (), ("aten::log_softmax", "aten::cross_entropy_loss")),
         "autograd_other"),
        (op("aten::mm", 1.0, ((515, 576), (576, 100)), ()), "autograd_other"),
        (op("_RowReplayed", 1.0), "autograd_other"),                # its own Python time
    ]
    for record, want in cases:
        assert bd.classify(record, dims) == want, record


def test_breakdown_sums_to_the_step_per_token() -> None:
    bd, dims = _smol_dims()
    ops = [bd.OpRecord("aten::mm", 600.0, ((515, 576), (576, 960))),
           bd.OpRecord("aten::copy_", 20.0, (), ("alchemist::replay_readout",)),
           bd.OpRecord("aten::_scaled_dot_product_flash_attention_for_cpu", 150.0),
           bd.OpRecord("aten::mul", 50.0), bd.OpRecord("aten::mm", 30.0, ((515, 16), (16, 576))),
           bd.OpRecord("aten::add_", 40.0, (), ("Optimizer.step#AdamW.step",))]
    got = bd.breakdown(ops, 1000.0, 100, dims)
    assert tuple(got) == bd.CATEGORIES
    assert got == pytest.approx({"gather": 0.2, "projections": 6.0, "attention": 1.5,
                                 "pointwise": 0.5, "lora": 0.3, "autograd_other": 1.5})
    assert sum(got.values()) == pytest.approx(10.0)
    assert bd.replay_overhead_share(got) == pytest.approx(0.02)
    # profiler overhead can make the classified ops exceed the step: the rest is 0, not negative
    assert bd.breakdown(ops, 500.0, 100, dims)["autograd_other"] == 0.0
    with pytest.raises(ValueError):
        bd.breakdown(ops, 1000.0, 0, dims)


def test_readout_region_names_agree() -> None:
    from alchemist_sgl.store import readout
    from alchemist_sgl.train import replay_rows
    from eval.experiments import _replay_breakdown as bd

    assert bd.READOUT_REGION == replay_rows.READOUT_REGION == readout.READOUT_REGION


def test_profiled_step_attributes_a_store_readout_to_gather() -> None:
    """A real profile: a read-out of pinned pages into a buffer, a matmul of a projection's shape
    and an elementwise op land in gather, projections and pointwise."""
    from alchemist_sgl.core.prefix import Namespace
    from alchemist_sgl.core.plan import RecordPlan
    from alchemist_sgl.core.records import RequestExtend
    from alchemist_sgl.store import ActivationStore

    bd, _ = _smol_dims()
    plan = RecordPlan(TINY, ("o",), page_tokens=4)
    store = ActivationStore(plan, host_bytes=8 * plan.slot_bytes, dtype=torch.float32)
    ns, tokens = Namespace("v0"), list(range(10, 22))
    batch = store.open_batch([RequestExtend("r", ns, tokens, 0, len(tokens), 0)])
    for layer in range(TINY.layers):
        store.write(batch, "o", layer, torch.randn(len(tokens), plan.widths["o"]))
    store.close_batch(batch)
    pin = store.pin(tokens, ns)
    (_, _, rows), = store.segments(pin, is_lazy=True)
    dims = bd.MatmulDims(frozenset({(64, 192)}), rank=4)
    x, w = torch.randn(300, 64), torch.randn(64, 192)

    def step() -> None:
        out = torch.empty(len(tokens), plan.widths["o"])
        for layer in range(TINY.layers):
            rows["o"].copy_layer(layer, out)
        torch.mm(x, w).mul(2.0)

    after_calls = []
    got = bd.profile_breakdown(step, 10, dims, steps=2, after=lambda: after_calls.append(1))
    store.unpin(pin)
    assert after_calls == [1, 1] and len(got["profiled_steps_s"]) == 2
    assert got["profiled_step_s"] == min(got["profiled_steps_s"])
    ms = got["ms_per_token"]
    assert ms["gather"] > 0 and ms["projections"] > 0 and ms["pointwise"] > 0
    assert ms["lora"] == 0 and ms["attention"] == 0
    assert sum(ms.values()) == pytest.approx(got["profiled_step_s"] * 100.0)


def test_linear_weight_is_read_as_d_out_by_d_in() -> None:
    bd, dims = _smol_dims()
    assert bd.classify(bd.OpRecord("aten::linear", 1.0, ((515, 576), (960, 576))), dims) == "projections"
    assert bd.classify(bd.OpRecord("aten::linear", 1.0, ((515, 576), (48, 576))), dims) == "lora"
