"""The activation store under the graph record plan (core/plan.py, Note [Graph plan]): slots sized
from the plan's widths (lse: fp32 stored bit-cast in a bf16 pool, read back bit for bit), the
graph tensors read back as written, and demotion under pressure keeps ``down`` (graph -> down;
no graph -> full step)."""

from __future__ import annotations

import torch

from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.store import ActivationStore
from tests.support.store_rig import NS, PAGE, SHAPE, expected, forward, make_store, prompts

torch.set_num_threads(1)
GRAPH = ("qkv", "o", "gate_up", "down", "attn", "lse")


def _names(store, tokens) -> list[tuple[int, int, tuple[str, ...] | None]]:
    pin = store.pin(tokens, NS)
    out = []
    for start, end, tensors in store.segments(pin):
        if tensors is not None:
            want = expected(store, tokens, [(start, end)])
            assert all(torch.equal(got, want[name]) for name, got in tensors.items())
        out.append((start, end, None if tensors is None else tuple(tensors)))
    store.unpin(pin)
    return out


def test_graph_pages_read_back_and_demote_to_down() -> None:
    store = make_store(slots=4, budget="graph")
    assert store.plan.tensors == GRAPH and store.plan.keep_on_demotion == "down"
    ps = prompts(6)
    for i, p in enumerate(ps):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    assert store.status()["demotions"] == 3 and store.status()["evictions"] == 0
    for p in ps[:3]:
        assert _names(store, p) == [(0, PAGE, ("down",))]
    for p in ps[3:]:
        assert _names(store, p) == [(0, PAGE, GRAPH)]


def test_bf16_pool_keeps_the_fp32_lse_exactly() -> None:
    shape = ModelShape(hidden=8, heads=3, kv_heads=1, head_dim=4, intermediate=16, layers=2,
                       dtype_bytes=2)
    plan = choose_plan(shape, "graph", page_tokens=PAGE)
    # per layer: qkv 12 + 2 * 4, o 8, gate_up 32, down 8, attn 12 bf16; 3 fp32 heads
    assert plan.widths["lse"] == 6
    assert plan.bytes_per_token == 2 * ((20 + 8 + 32 + 8 + 12) * 2 + 3 * 4)
    store = ActivationStore(plan, host_bytes=8 * plan.slot_bytes, dtype=torch.bfloat16)
    tokens = list(range(100, 100 + PAGE + 2))
    lse = torch.randn(shape.layers, len(tokens), shape.heads) * 10  # bits a bf16 cast would lose
    batch = store.open_batch([RequestExtend("a", NS, tokens, 0, len(tokens), 0)])
    for name, width in plan.widths.items():
        for layer in range(shape.layers):
            rows = (lse[layer].view(torch.bfloat16) if name == "lse"
                    else torch.full((len(tokens), width), float(layer), dtype=torch.bfloat16))
            store.write(batch, name, layer, rows)
    store.close_batch(batch)
    pin = store.pin(tokens, NS)
    got = store.gather(pin)["lse"]
    store.unpin(pin)
    assert got.dtype == torch.bfloat16 and torch.equal(got.contiguous().view(torch.float32), lse)
