"""Store rigs: a fake forward through the activation store's real write path, and stored samples.

Owns the small model shape (``SHAPE``, pages of ``PAGE`` tokens, namespace ``NS``), ``make_store``,
``forward`` (one extend forward where every recorded row is a function of (prefix tokens,
position, layer, column), so pages written by different requests for the same prefix hold the
same values, as in a real model: Note [Stitching] in store/activation_store.py), ``expected`` (the
rows a read must give back), ``prompts``, and the trainer-level fixture ``stored_samples`` (HF +
PEFT recordings of the tiny Llama written through the store). Imports torch, the store, record
plan and train value types; never sglang.
"""

from __future__ import annotations

import pytest
import torch

from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.train import PromptSegment, Recording, Sample, load_fused_weights
from tests.support.hfref import build_hf_peft, hf_record, model_dir, random_adapter

NS = Namespace("v0")
PAGE = 4
SHAPE = ModelShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=3,
                   dtype_bytes=4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_store(slots: int = 1000, budget: int | str | tuple = "full", device_slots: int = 0,
               clock: FakeClock | None = None, ttl_s: float = float("inf")) -> ActivationStore:
    plan = choose_plan(SHAPE, budget, page_tokens=PAGE)
    return ActivationStore(plan, host_bytes=slots * plan.slot_bytes,
                           device_bytes=device_slots * plan.slot_bytes, dtype=torch.float32,
                           clock=clock or FakeClock(), ttl_s=ttl_s)


def reference_row(tokens: list[int], pos: int, layer: int, width: int, salt: int) -> torch.Tensor:
    value = (sum(t * (i + 1) for i, t in enumerate(tokens[:pos + 1])) * 7 + salt) % 65521
    return float(value + 100_000 * layer) + 0.25 * torch.arange(width, dtype=torch.float32)


def forward(store: ActivationStore, requests: list[tuple], namespace: Namespace = NS) -> None:
    """One extend forward. requests: (rid, prompt tokens, prefix_len, extend_len[, recording])."""
    extends, rows = [], 0
    for req in requests:
        rid, tokens, prefix_len, extend_len = req[:4]
        extends.append(RequestExtend(rid, namespace, tokens, prefix_len, extend_len, rows,
                                     req[4] if len(req) > 4 else True))
        rows += extend_len
    batch = store.open_batch(extends)
    for salt, (name, width) in enumerate(store.plan.widths.items()):
        for layer in range(SHAPE.layers):
            out = torch.empty((rows, width))
            for ext in extends:
                for i in range(ext.extend_len):
                    out[ext.row_offset + i] = reference_row(
                        list(ext.prompt_tokens), ext.prefix_len + i, layer, width, salt)
            store.write(batch, name, layer, out)
    store.close_batch(batch)


def expected(store: ActivationStore, tokens: list[int], ranges) -> dict[str, torch.Tensor]:
    out = {}
    for salt, (name, width) in enumerate(store.plan.widths.items()):
        out[name] = torch.stack([
            torch.stack([reference_row(tokens, p, layer, width, salt)
                         for lo, hi in ranges for p in range(lo, hi)])
            if any(hi > lo for lo, hi in ranges) else torch.empty(0, width)
            for layer in range(SHAPE.layers)])
    return out


def prompts(n: int, pages: int = 1) -> list[list[int]]:
    return [[1000 * i + t for t in range(pages * PAGE)] for i in range(n)]


# ------------------------------------------------------------------ trainer level
TPAGE = 16


def write_extend(store: ActivationStore, rid: str, tokens: list[int], start: int, rec: dict) -> None:
    """One extend forward of tokens[start:] through the store's real write path."""
    batch = store.open_batch([RequestExtend(rid, NS, tokens, start, len(tokens) - start, 0)])
    for name in store.plan.tensors:
        for layer in range(store.plan.shape.layers):
            store.write(batch, name, layer, rec[name][layer, start:])
    store.close_batch(batch)


@pytest.fixture(scope="module")
def stored_samples():
    """(weights, adapter, store, [(prompt, response)]): one prompt fully recorded (two pages and a
    tail), one with a hole [16, 32) inside its recording and its tail recomputed."""
    weights = load_fused_weights(model_dir("tiny"))
    adapter = random_adapter(weights.spec, rank=4, seed=3)
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    plan = choose_plan(ModelShape.from_hf_config(peft_model.config, 4), "full", page_tokens=TPAGE)
    store = ActivationStore(plan, host_bytes=16 * plan.slot_bytes, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    ids = lambda n: [int(t) for t in torch.randint(10, 40000, (n,), generator=gen)]  # noqa: E731
    full, holed = ids(2 * TPAGE + 7), ids(3 * TPAGE + 5)
    write_extend(store, "full", full, 0, hf_record(peft_model, torch.tensor(full)))
    rec = hf_record(peft_model, torch.tensor(holed))
    write_extend(store, "first", holed[:TPAGE], 0, {k: v[:, :TPAGE] for k, v in rec.items()})
    write_extend(store, "rest", holed[:3 * TPAGE], 2 * TPAGE, rec)
    return weights, adapter, store, [(full, ids(9)), (holed, ids(6))]


def store_samples(store, pairs, is_lazy: bool):
    """Samples over ``store``'s segments of each prompt (lazy or copied read-out) and their pins."""
    pins = [store.pin(p, NS) for p, _ in pairs]
    samples = [Sample(p, r, tuple(PromptSegment(s, e, None if t is None else Recording(0, t))
                                  for s, e, t in store.segments(pin, is_lazy=is_lazy)))
               for (p, r), pin in zip(pairs, pins)]
    return samples, pins
