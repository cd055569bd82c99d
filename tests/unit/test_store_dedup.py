"""store.dedup: on, a prompt recorded twice is stored once; off, each request keeps its own copy.

Each request here writes rows that depend on its rid as well as on the position (unlike a real
model, where the same prefix gives the same rows), so a read that returned another request's
pages, or a page stored once and shared, would not give back what that request wrote.
"""

from __future__ import annotations

import torch

from alchemist_sgl.core.plan import choose_plan
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.record.export import recording_coverage
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.store.recordings import StoreRecordings
from tests.support.store_rig import NS, PAGE, SHAPE

torch.set_num_threads(1)
PROMPT = list(range(100, 100 + 5 * PAGE + 3))  # 5 full pages and a 3-token tail


def _store(dedup: bool) -> ActivationStore:
    plan = choose_plan(SHAPE, "full", page_tokens=PAGE)
    return ActivationStore(plan, host_bytes=100 * plan.slot_bytes, dtype=torch.float32,
                           dedup=dedup)


def _record(store: ActivationStore, rid: str, tokens: list[int], seed: int, prefix_len: int = 0
            ) -> dict[str, torch.Tensor]:
    """One extend of tokens[prefix_len:] with random rows; returns them, [layers, rows, width]."""
    gen = torch.Generator().manual_seed(seed)
    n = len(tokens) - prefix_len
    rows = {name: torch.randn(SHAPE.layers, n, width, generator=gen)
            for name, width in store.plan.widths.items()}
    batch = store.open_batch([RequestExtend(rid, NS, tokens, prefix_len, n, 0)])
    for name in store.plan.tensors:
        for layer in range(SHAPE.layers):
            store.write(batch, name, layer, rows[name][layer])
    store.close_batch(batch)
    return rows


def _read(store: ActivationStore, tokens: list[int], rid: str | None) -> dict[str, torch.Tensor]:
    pin = store.pin(tokens, NS, rid=rid)
    assert pin.coverage.covered == ((0, len(tokens)),)
    try:
        return store.gather(pin)
    finally:
        store.unpin(pin)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dedup_on_stores_a_prompt_recorded_twice_once() -> None:
    store = _store(dedup=True)
    first = _record(store, "a", PROMPT, seed=1)
    _record(store, "b", PROMPT, seed=2)  # same prefix: its pages exist, these rows are not stored
    bpt = store.plan.bytes_per_token
    assert store.status()["bytes_stored"] == len(PROMPT) * bpt
    assert store.status()["bytes_deduplicated"] == len(PROMPT) * bpt
    assert _equal(_read(store, PROMPT, None), first)


def test_dedup_off_stores_each_recording_and_reads_each_back() -> None:
    store = _store(dedup=False)
    first = _record(store, "a", PROMPT, seed=1)
    second = _record(store, "b", PROMPT, seed=2)
    bpt = store.plan.bytes_per_token
    assert store.status()["bytes_stored"] == 2 * len(PROMPT) * bpt
    assert store.status()["bytes_deduplicated"] == 0
    assert store.status()["pages"] == 2 * 6
    assert not _equal(first, second)
    assert _equal(_read(store, PROMPT, "a"), first)
    assert _equal(_read(store, PROMPT, "b"), second)
    # Readers that know only the tokens (the online loop, debug commands) get the latest one.
    assert _equal(_read(store, PROMPT, None), second)
    pin = StoreRecordings(store).pin(PROMPT, NS.base_version)
    assert pin is not None and pin.coverage.covered_tokens == len(PROMPT)
    store.unpin(pin)


def test_dedup_off_never_stitches_another_requests_prefix() -> None:
    """A radix hit over another request's prefix leaves that prefix a hole of this recording."""
    store = _store(dedup=False)
    longer = PROMPT + list(range(900, 900 + PAGE + 1))
    _record(store, "a", PROMPT, seed=1)
    own = _record(store, "b", longer, seed=2, prefix_len=5 * PAGE)  # page-aligned radix hit
    cov = store.coverage(longer, NS, rid="b")
    assert cov.covered == ((5 * PAGE, len(longer)),) and cov.missing == ((0, 5 * PAGE),)
    assert recording_coverage(store, longer, NS)["covered"] == [[5 * PAGE, len(longer)]]
    pin = store.pin(longer, NS, rid="b")
    got = store.gather(pin)
    store.unpin(pin)
    assert _equal(got, own)
    assert store.status()["bytes_stored"] == (len(PROMPT) + len(longer) - 5 * PAGE) * store.plan.bytes_per_token


def test_dedup_off_unknown_prompt_and_other_namespace_have_no_recording() -> None:
    store = _store(dedup=False)
    _record(store, "a", PROMPT, seed=1)
    assert store.coverage(PROMPT[:-1], NS).covered == ()
    assert store.coverage(PROMPT, Namespace("v1")).covered == ()
    assert store.coverage(PROMPT, NS, rid="nobody").missing == ((0, len(PROMPT)),)
