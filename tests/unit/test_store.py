"""store/: ActivationStore dedup, eviction, pinning, stitching, coverage holes, namespaces.

A fake forward (tests/support/store_rig.py) makes every recorded row a function of (prefix tokens, position, layer, column),
so pages written by different requests for the same prefix hold the same values, as they do in a
real model (Note [Stitching] in store/activation_store.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.store import ActivationStore
from tests.support.store_rig import NS, PAGE, SHAPE, FakeClock, expected, forward, make_store

torch.set_num_threads(1)
def assert_gather_exact(store: ActivationStore, tokens: list[int], namespace=NS):
    pin = store.pin(tokens, namespace)
    got = store.gather(pin)
    want = expected(store, tokens, pin.coverage.covered)
    for name in store.plan.widths:
        assert got[name].shape == (SHAPE.layers, pin.coverage.covered_tokens,
                                   store.plan.widths[name])
        assert torch.equal(got[name], want[name]), name
    store.unpin(pin)
    return pin.coverage


def test_shared_system_prompt_stored_once() -> None:
    rng = random.Random(0)
    system = [rng.randrange(1000) for _ in range(37)]
    suffixes = [[rng.randrange(1000) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    store = make_store()
    bpt = store.plan.bytes_per_token
    aligned = len(system) // PAGE * PAGE  # what a page-aligned radix hit gives
    for i, suffix in enumerate(suffixes):
        prompt = system + suffix
        prefix = 0 if i == 0 else aligned
        forward(store, [(f"r{i}", prompt, prefix, len(prompt) - prefix)])
    ideal = (len(system) + sum(map(len, suffixes))) * bpt
    stored = store.status()["bytes_stored"]
    # Each later request re-records at most the one page that straddles the system prompt's end.
    assert ideal <= stored <= ideal + len(suffixes) * PAGE * bpt
    assert store.status()["bytes_deduplicated"] == (len(suffixes) - 1) * aligned * bpt
    for suffix in suffixes:
        cov = assert_gather_exact(store, system + suffix)
        assert cov.missing == ()


def test_dedup_without_radix_recomputing_everything() -> None:
    system = list(range(1, 41))  # 10 full pages
    store = make_store()
    bpt = store.plan.bytes_per_token
    for i in range(4):
        prompt = system + [500 + i] * 6
        forward(store, [(f"r{i}", prompt, 0, len(prompt))])
    assert store.status()["bytes_stored"] == (40 + 4 * 6) * bpt
    assert store.status()["bytes_deduplicated"] == 3 * 40 * bpt
    assert store.status()["pages"] == 10 + 4 * 2  # per request: 1 full + a 2-token tail


def test_same_new_page_twice_in_one_batch_is_stored_once() -> None:
    prompt = list(range(10))
    store = make_store()
    forward(store, [("a", prompt, 0, 10), ("b", prompt, 0, 10)])
    assert store.status()["bytes_stored"] == 10 * store.plan.bytes_per_token
    assert_gather_exact(store, prompt)


def test_stitching_radix_prefix_with_unaligned_tail() -> None:
    a = list(range(100, 137))  # 37 tokens: 9 pages + 1-token tail
    store = make_store()
    forward(store, [("a", a, 0, len(a))])
    b = a + list(range(300, 320))
    forward(store, [("b", b, 36, len(b) - 36)])  # radix hit ends on a page boundary
    cov = assert_gather_exact(store, b)
    assert cov.covered == ((0, len(b)),)
    # The tail of `a` is reused by an identical prompt (radix recomputes the last partial page).
    before = store.status()["bytes_stored"]
    forward(store, [("c", a, 36, 1)])
    assert store.status()["bytes_stored"] == before
    assert assert_gather_exact(store, a).covered == ((0, 37),)


def test_coverage_with_holes_from_decoded_tokens() -> None:
    a = list(range(1, 41)) + [7, 8]  # 42 tokens: 10 pages + 2-token tail
    store = make_store()
    forward(store, [("a", a, 0, len(a))])
    decoded = [900, 901, 902, 903, 904, 905]  # a's answer: in the radix cache, never prefilled
    b = a + decoded + list(range(50, 70))     # 68 tokens
    forward(store, [("b", b, 48, len(b) - 48)])
    cov = assert_gather_exact(store, b)
    assert cov.covered == ((0, 42), (48, 68))
    assert cov.missing == ((42, 48),)
    # A sequence with response tokens appended finds the prompt's tail page too.
    cov = store.coverage(a + [11, 12, 13], NS)
    assert cov.covered == ((0, 42),) and cov.missing == ((42, 45),)
    # Segments tile the sequence in order, the way the trainer takes them.
    pin = store.pin(b, NS)
    segments = store.segments(pin)
    assert [(s, e, t is None) for s, e, t in segments] == [(0, 42, False), (42, 48, True),
                                                           (48, 68, False)]
    want = expected(store, b, [(48, 68)])
    assert all(torch.equal(segments[2][2][n], want[n]) for n in want)
    store.unpin(pin)


def test_chunked_prefill_joins_pages_across_extends() -> None:
    prompt = list(range(5, 55))  # 50 tokens, chunks of 10 cut pages of 4 in the middle
    store = make_store()
    for start in range(0, 50, 10):
        forward(store, [("r", prompt, start, 10)])
    cov = assert_gather_exact(store, prompt)
    assert cov.covered == ((0, 50),)
    assert store.status()["unaligned_tokens_skipped"] == 0
    assert store.status()["open_writers"] == 0


def test_unaligned_radix_hit_skips_rows_to_the_next_page() -> None:
    prompt = list(range(5, 45))
    store = make_store()
    forward(store, [("r", prompt, 34, 6)])  # 34 % 4 == 2: rows 34, 35 cannot form a keyed page
    assert store.status()["unaligned_tokens_skipped"] == 2
    assert assert_gather_exact(store, prompt).covered == ((36, 40),)


def test_mixed_batch_records_only_prompt_rows_of_recording_requests() -> None:
    store = make_store()
    p1, p2, p3 = list(range(12)), list(range(20, 28)), list(range(40, 50))
    # p2 decodes one token (prefix == prompt length), p3 opted out of recording.
    forward(store, [("a", p1, 0, 12), ("b", p2, len(p2), 1), ("c", p3, 0, 10, False)])
    assert store.coverage(p1, NS).covered == ((0, 12),)
    assert store.coverage(p2, NS).covered == ()
    assert store.coverage(p3, NS).covered == ()
    assert store.status()["bytes_stored"] == 12 * store.plan.bytes_per_token


def test_full_store_evicts_lru_and_never_blocks() -> None:
    store = make_store(slots=4, budget="down")  # one tensor: nothing to demote, evict directly
    for i in range(6):
        forward(store, [(f"r{i}", [1000 * i + t for t in range(PAGE)], 0, PAGE)])
    status = store.status()
    assert status["pages"] == 4 and status["evictions"] == 2
    assert status["host_bytes"] == 4 * store.plan.slot_bytes
    assert store.coverage([t for t in range(PAGE)], NS).covered == ()  # r0 evicted first
    assert store.coverage([5000 + t for t in range(PAGE)], NS).covered == ((0, PAGE),)


def test_lookup_refreshes_lru_order() -> None:
    store = make_store(slots=2, budget="down")
    first, second = list(range(4)), list(range(10, 14))
    forward(store, [("a", first, 0, 4)])
    forward(store, [("b", second, 0, 4)])
    store.coverage(first, NS)  # first is now the most recently used
    forward(store, [("c", list(range(20, 24)), 0, 4)])
    assert store.coverage(first, NS).covered == ((0, 4),)
    assert store.coverage(second, NS).covered == ()


def test_pinned_pages_survive_and_full_pinned_store_drops_new_pages() -> None:
    store = make_store(slots=3, budget="down")
    sample = list(range(12))
    forward(store, [("s", sample, 0, 12)])
    pin = store.pin(sample, NS)
    forward(store, [("x", list(range(100, 108)), 0, 8)])  # no unpinned page to evict
    status = store.status()
    assert status["evictions"] == 0 and status["dropped_tokens"] == 8
    got = store.gather(pin)
    want = expected(store, sample, pin.coverage.covered)
    assert all(torch.equal(got[n], want[n]) for n in got)
    store.unpin(pin)
    with pytest.raises(ValueError):
        store.unpin(pin)
    forward(store, [("y", list(range(200, 208)), 0, 8)])
    assert store.status()["evictions"] == 2


def test_namespaces_do_not_share_pages() -> None:
    prompt = list(range(20))
    store = make_store()
    forward(store, [("a", prompt, 0, 20)])
    assert store.coverage(prompt, Namespace("v1")).covered == ()
    assert store.coverage(prompt, Namespace("v0", "lora@v1")).covered == ()
    forward(store, [("b", prompt, 0, 20)], namespace=Namespace("v0", "lora@v1"))
    assert assert_gather_exact(store, prompt, Namespace("v0", "lora@v1")).covered == ((0, 20),)
    assert store.status()["bytes_stored"] == 2 * 20 * store.plan.bytes_per_token


def test_ttl_expires_unpinned_pages_with_fake_clock() -> None:
    clock = FakeClock()
    store = make_store(clock=clock, ttl_s=10.0)
    old, kept = list(range(8)), list(range(50, 58))
    forward(store, [("a", old, 0, 8)])
    forward(store, [("k", kept, 0, 8)])
    pin = store.pin(kept, NS)
    clock.now = 11.0
    forward(store, [("n", list(range(90, 94)), 0, 4)])  # allocation sweeps expired pages
    assert store.coverage(old, NS).covered == ()
    assert store.coverage(kept, NS).covered == ((0, 8),)
    assert store.status()["expirations"] == 2
    store.unpin(pin)


def test_device_tier_spills_lru_pages_to_host() -> None:
    store = make_store(slots=4, device_slots=2)
    prompts = [[1000 * i + t for t in range(PAGE)] for i in range(5)]
    for i, prompt in enumerate(prompts):
        forward(store, [(f"r{i}", prompt, 0, PAGE)])
    status = store.status()
    assert status["spills"] == 3 and status["evictions"] == 0 and status["demotions"] == 0
    assert status["device_bytes"] == 2 * store.plan.slot_bytes
    assert status["host_bytes"] == 3 * store.plan.slot_bytes
    for prompt in prompts:
        assert assert_gather_exact(store, prompt).covered == ((0, PAGE),)


def test_byte_budget_plan_records_only_down_rows() -> None:
    store = make_store(budget=3 * 8 * 4)  # room for down (3 layers x width 8, fp32) only
    assert store.plan.tensors == ("down",)
    prompt = list(range(9))
    forward(store, [("a", prompt, 0, 9)])
    assert set(assert_gather_exact(store, prompt).covered) == {(0, 9)}
    assert store.status()["record_ms_mean"] >= 0.0


def test_discarded_forward_publishes_nothing_and_frees_its_slots() -> None:
    store = make_store(slots=8)
    prompt = list(range(10))
    batch = store.open_batch([RequestExtend("a", NS, prompt, 0, 10, 0)])
    store.write(batch, "down", 0, torch.zeros(10, 8))  # then the forward dies mid-way
    store.discard_batch(batch)
    assert store.status()["pages"] == 0 and store.status()["open_writers"] == 0
    forward(store, [("b", list(range(100, 132)), 0, 32)])  # all 8 slots are free again
    assert store.status()["pages"] == 8 and store.status()["evictions"] == 0
