"""store/readout.py, Note [Per-layer read-out]: ``segments(pin, is_lazy=True)`` reads exactly what
the copied read-out holds, and the trainer computes exactly the same loss and gradients from it.

Store level: the fake forward of tests/support/store_rig.py (every row a function of prefix, position, layer
and column) with tails, holes, demoted pages and pages spread over two tiers. Trainer level: the
tiny Llama with recordings from HF + PEFT written through the store's real write path, in the
joint layout (eager; the compiled layer is in test_train_compiled.py), the segments layout and
response-only mode: lazy and copied recordings give bitwise equal losses and gradients.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.train import ReplayTrainer
from tests.support.hfref import adapter_grads
from tests.support.store_rig import (NS, PAGE, SHAPE, TPAGE, forward, make_store, prompts,
                                     store_samples)
from tests.support.store_rig import stored_samples  # noqa: F401 (a fixture)

torch.set_num_threads(1)


def assert_lazy_equals_copied(store: ActivationStore, tokens: list[int], namespace=NS) -> list:
    """Lazy and copied segments tile alike and hold the same values, read every way."""
    pin = store.pin(tokens, namespace)
    copied, lazy = store.segments(pin), store.segments(pin, is_lazy=True)
    assert [(s, e, t and tuple(t)) for s, e, t in lazy] == [(s, e, t and tuple(t)) for s, e, t in copied]
    for (start, end, want), (_, _, got) in zip(copied, lazy):
        if want is None:
            continue
        n = end - start
        for name, rows in got.items():
            ref = want[name]
            assert rows.shape == ref.shape and rows.dtype == ref.dtype
            assert torch.equal(rows.materialize(), ref)
            for layer in range(SHAPE.layers):
                assert torch.equal(rows[layer], ref[layer])
                strided = torch.full((n, 2 * ref.shape[2]), float("nan"))[:, ::2]
                assert torch.equal(rows.copy_layer(layer, strided), ref[layer])
            for lo, hi in {(0, n), (1, n), (0, 1), (n // 2, n), (min(PAGE + 1, n - 1), n)}:
                assert torch.equal(rows.rows(lo, hi).materialize(), ref[:, lo:hi]), (lo, hi)
    store.unpin(pin)
    return lazy


def test_lazy_rows_of_tails_holes_and_stitched_pages() -> None:
    a = list(range(1, 41)) + [7, 8]  # 10 pages + a 2-token tail
    store = make_store()
    forward(store, [("a", a, 0, len(a))])
    b = a + [900, 901, 902, 903, 904, 905] + list(range(50, 70))  # a hole at [42, 48)
    forward(store, [("b", b, 48, len(b) - 48)])
    lazy = assert_lazy_equals_copied(store, a)
    assert [(s, e) for s, e, _ in lazy] == [(0, 42)]
    assert all(r.is_indexed for r in lazy[0][2].values()), "whole pages: one index_select a layer"
    lazy = assert_lazy_equals_copied(store, b)
    assert [(s, e, t is None) for s, e, t in lazy] == [(0, 42, False), (42, 48, True), (48, 68, False)]
    assert not lazy[0][2]["down"].rows(1, 42).is_indexed  # starts inside a page: per-page copies


def test_lazy_rows_of_demoted_pages() -> None:
    store = make_store(slots=3)
    long = prompts(1, pages=3)[0][:3 * PAGE - 1]  # two full pages and a tail
    forward(store, [("long", long, 0, len(long))])
    for i, p in enumerate(prompts(2)):  # each needs a slot: long's oldest pages are demoted
        forward(store, [(f"f{i}", p, 0, PAGE)])
    lazy = assert_lazy_equals_copied(store, long)
    assert any(t is not None and tuple(t) == ("down",) for _, _, t in lazy)
    assert not any(r.is_indexed for _, _, t in lazy if t and tuple(t) == ("down",) for r in t.values())


def test_lazy_rows_across_two_tiers() -> None:
    store = make_store(slots=20, device_slots=2)  # a second pool (on the CPU here)
    long = list(range(300, 300 + 5 * PAGE))
    forward(store, [("long", long, 0, len(long))])
    status = store.status()
    assert status["device_bytes"] == 2 * store.plan.slot_bytes and status["host_bytes"] > 0
    lazy = assert_lazy_equals_copied(store, long)
    assert not lazy[0][2]["qkv"].is_indexed  # two pools: one copy per page


def test_lazy_rows_refuse_bad_reads() -> None:
    store = make_store()
    tokens = list(range(1, 2 * PAGE + 1))
    forward(store, [("a", tokens, 0, len(tokens))])
    pin = store.pin(tokens, NS)
    (_, _, lazy), = store.segments(pin, is_lazy=True)
    rows = lazy["o"]
    with pytest.raises(ValueError):
        rows.copy_layer(0, torch.empty(len(tokens) - 1, rows.shape[2]))
    with pytest.raises(ValueError):
        rows.rows(0, len(tokens) + 1)
    with pytest.raises(ValueError):
        rows.rows(3, 3)
    with pytest.raises(TypeError):
        rows[0:1]
    store.unpin(pin)


# ------------------------------------------------------------------ trainer level
@pytest.mark.parametrize("layout,mode", [("joint", "exact"), ("segments", "exact"),
                                         ("segments", "response_only")])
def test_lazy_and_copied_recordings_train_identically(stored_samples, layout, mode) -> None:
    weights, adapter, store, pairs = stored_samples
    results = []
    for is_lazy in (False, True):
        samples, pins = store_samples(store, pairs, is_lazy)
        assert [[(s.start, s.end) for s in x.segments if s.recording] for x in samples] == \
            [[(0, 2 * TPAGE + 7)], [(0, TPAGE), (2 * TPAGE, 3 * TPAGE)]]
        trainer = ReplayTrainer(weights, TrainConfig(lora=LoraConfig(rank=4, alpha=adapter.alpha),
                                                     gradient_mode=mode), layout=layout)
        trainer.adapter.load_state_dict(adapter.state_dict())
        loss, counts, _ = trainer.accumulate(samples)
        assert counts.replayed_tokens == 2 * TPAGE + 7 + 2 * TPAGE
        results.append((loss, {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()}))
        if layout == "joint":  # the work units too (the online loop's path)
            trainer.adapter.zero_grad(set_to_none=True)
            run = trainer.begin_step(samples)
            while run.units < run.units_total - 1:
                run.run_unit()
            results[-1] += ({k: v.clone() for k, v in adapter_grads(trainer.adapter).items()},)
        for pin in pins:
            store.unpin(pin)
    (loss_c, *grads_c), (loss_l, *grads_l) = results
    assert loss_l == loss_c
    for got, want in zip(grads_l, grads_c):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
