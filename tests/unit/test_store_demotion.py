"""store/index.py Note [Demote before evict] and store Note [Store lifetime], at the store level.

Real tensors through the real write path (``forward`` of tests/support/store_rig.py: every row a function of
prefix, position, layer and column), read back with ``gather``/``segments`` and compared with the
values that were written.
"""

from __future__ import annotations

import torch

from alchemist_sgl.core.prefix import Namespace
from tests.support.store_rig import NS, PAGE, SHAPE, expected, forward, make_store, prompts

torch.set_num_threads(1)


def check_segments(store, tokens, namespace=NS) -> list[tuple[int, int, tuple[str, ...] | None]]:
    """Every segment holds exactly the written values; returns (start, end, tensor names)."""
    pin = store.pin(tokens, namespace)
    out = []
    for start, end, tensors in store.segments(pin):
        if tensors is None:
            out.append((start, end, None))
            continue
        want = expected(store, tokens, [(start, end)])
        for name, got in tensors.items():
            assert got.shape == (SHAPE.layers, end - start, store.plan.widths[name])
            assert torch.equal(got, want[name]), (name, start, end)
        out.append((start, end, tuple(tensors)))
    store.unpin(pin)
    return out


def test_pressure_demotes_oldest_pages_to_down_before_evicting() -> None:
    store = make_store(slots=4)
    assert store.plan.keep_on_demotion == "down"
    ps = prompts(6)
    for i, p in enumerate(ps):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    status = store.status()
    # r4 needed a slot: r0's slot became a container and r1 moved in (2 demotions); r5: r2 moved in.
    assert status["demotions"] == 3 and status["demoted_pages"] == 3
    assert status["evictions"] == 0 and status["pages"] == 6
    assert status["host_bytes"] == 4 * store.plan.slot_bytes
    down_bytes = SHAPE.layers * store.plan.widths["down"] * SHAPE.dtype_bytes
    assert status["bytes_stored"] == PAGE * (3 * down_bytes + 3 * store.plan.bytes_per_token)
    for p in ps[:3]:
        assert check_segments(store, p) == [(0, PAGE, ("down",))]
    for p in ps[3:]:
        assert check_segments(store, p) == [(0, PAGE, ("qkv", "o", "gate_up", "down"))]


def test_a_range_is_cut_where_demotion_changed_the_tensors() -> None:
    store = make_store(slots=3)
    long = prompts(1, pages=3)[0][:3 * PAGE - 1]  # two full pages and a tail
    forward(store, [("a", long, 0, len(long))])
    forward(store, [("b", prompts(2)[1], 0, PAGE)])  # demotes the two oldest pages of "a"
    assert check_segments(store, long) == [(0, 2 * PAGE, ("down",)),
                                           (2 * PAGE, 3 * PAGE - 1, ("qkv", "o", "gate_up", "down"))]
    pin = store.pin(long, NS)
    assert set(store.gather(pin)) == {"down"}  # what every covered page still holds
    store.unpin(pin)


def test_eviction_only_when_nothing_is_left_to_demote() -> None:
    store = make_store(slots=2)
    per = store._host_pool.kept_per_slot
    assert per == 8  # 64 elements per token and layer, down is 8 of them
    ps = prompts(per + 3)
    for i, p in enumerate(ps[:per + 1]):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    # r0..r7 demoted into r0's old slot (a full container), r8 full in the other slot.
    assert (store.status()["demotions"], store.status()["evictions"]) == (per, 0)
    forward(store, [("r9", ps[per + 1], 0, PAGE)])
    # One full page and no open container: demotion cannot free a slot, so the least recently
    # used page goes, and with it its whole container.
    status = store.status()
    assert (status["evictions"], status["pages"], status["demoted_pages"]) == (per, 2, 0)
    forward(store, [("r10", ps[per + 2], 0, PAGE)])
    status = store.status()
    assert (status["demotions"], status["evictions"], status["demoted_pages"]) == (per + 2, per, 2)
    assert all(store.coverage(p, NS).covered == () for p in ps[:per])
    assert check_segments(store, ps[per]) == [(0, PAGE, ("down",))]
    assert check_segments(store, ps[per + 1]) == [(0, PAGE, ("down",))]
    assert check_segments(store, ps[per + 2]) == [(0, PAGE, ("qkv", "o", "gate_up", "down"))]


def test_pinned_pages_are_never_demoted_nor_their_container_evicted() -> None:
    store = make_store(slots=3)
    ps = prompts(4)
    for i, p in enumerate(ps[:3]):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    pin = store.pin(ps[0], NS)
    forward(store, [("r3", ps[3], 0, PAGE)])  # r1's slot becomes a container, r2 moves in
    assert store.status()["demotions"] == 2
    assert check_segments(store, ps[0]) == [(0, PAGE, ("qkv", "o", "gate_up", "down"))]
    store.unpin(pin)

    store = make_store(slots=2)
    per = store._host_pool.kept_per_slot
    ps = prompts(per + 3)
    for i, p in enumerate(ps[:per + 1]):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    pin = store.pin(ps[0], NS)  # a demoted page in the full container
    forward(store, [("r9", ps[per + 1], 0, PAGE)])
    assert store.status()["evictions"] == 1  # the full page r8, not the pinned container
    assert check_segments(store, ps[0]) == [(0, PAGE, ("down",))]
    store.unpin(pin)
    forward(store, [("r10", ps[per + 2], 0, PAGE)])
    assert store.status()["evictions"] == 1 + per  # now the container can go


def test_device_spills_into_a_full_host_tier_demote_there() -> None:
    store = make_store(slots=2, device_slots=1)
    ps = prompts(4)
    for i, p in enumerate(ps):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    status = store.status()
    assert (status["spills"], status["demotions"], status["evictions"]) == (3, 2, 0)
    assert check_segments(store, ps[0]) == [(0, PAGE, ("down",))]
    assert check_segments(store, ps[3]) == [(0, PAGE, ("qkv", "o", "gate_up", "down"))]


def test_one_tensor_plan_evicts_directly() -> None:
    store = make_store(slots=2, budget="down")
    for i, p in enumerate(prompts(3)):
        forward(store, [(f"r{i}", p, 0, PAGE)])
    status = store.status()
    assert (status["demotions"], status["evictions"]) == (0, 1)


def test_release_frees_versions_that_can_no_longer_replay() -> None:
    store = make_store(slots=16)
    old, kept, new = prompts(3, pages=2)
    v1 = Namespace("v1")
    forward(store, [("a", old, 0, len(old))])
    forward(store, [("k", kept, 0, len(kept))])
    forward(store, [("n", new, 0, len(new))], namespace=v1)
    pin = store.pin(kept, NS)  # a queued sample of v0
    used = store.status()["host_bytes"]
    assert store.release_namespaces(lambda ns: ns.base_version == "v1") == 2  # old's pages
    assert store.coverage(old, NS).covered == ()
    assert check_segments(store, new, v1) == [(0, 2 * PAGE, ("qkv", "o", "gate_up", "down"))]
    assert store.status()["host_bytes"] == used - 2 * store.plan.slot_bytes
    assert store.coverage(kept, NS).covered == ((0, 2 * PAGE),)  # pinned: kept until unpinned
    store.unpin(pin)
    assert store.coverage(kept, NS).covered == ()
    assert store.status()["released_pages"] == 4
    before = store.status()["host_bytes"]
    forward(store, [("late", prompts(5)[4], 0, PAGE)])  # a late write under released v0
    assert store.coverage(prompts(5)[4], NS).covered == ()
    assert store.status()["host_bytes"] == before and store.status()["released_pages"] == 5
    assert store.release_namespaces(lambda ns: ns.base_version == "v1") == 0


def test_containers_per_slot_for_real_shapes() -> None:
    from alchemist_sgl.core.plan import ModelShape, choose_plan
    from alchemist_sgl.store.pool import SlotPool
    from tests.support.shapes import LLAMA_1B_HF, SMOLLM2_HF

    for hf, per in ((SMOLLM2_HF, 9), (LLAMA_1B_HF, 11)):
        plan = choose_plan(ModelShape.from_hf_config(hf, 2))
        assert SlotPool(plan, 0, torch.bfloat16, "cpu", "host").kept_per_slot == per
