"""record/capture.py: the forward protocol, opt-out, and Note [Never raise into serving]."""

from __future__ import annotations

import torch

from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.record.capture import Capture
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.store import ActivationStore

torch.set_num_threads(1)
NS = Namespace("v0")
SHAPE = ModelShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=2,
                   dtype_bytes=4)


def make(**kwargs) -> tuple[Capture, ActivationStore]:
    plan = choose_plan(SHAPE, "full", page_tokens=4)
    store = ActivationStore(plan, host_bytes=64 * plan.slot_bytes, dtype=torch.float32)
    return Capture(store, plan, **kwargs), store


def run_forward(capture: Capture, extends: list[RequestExtend], fill: float = 1.0) -> None:
    rows = sum(e.extend_len for e in extends)
    capture.begin(extends)
    for layer in range(SHAPE.layers):
        for name, width in capture.plan.widths.items():
            out = torch.full((rows, width), fill + layer)
            capture.on_output(name, layer, out)
            out.zero_()  # the caller may overwrite its buffer in place after the hook
    capture.end()


def test_records_prompt_rows_and_copies_before_the_caller_reuses_its_buffer() -> None:
    capture, store = make()
    prompt = list(range(10))
    run_forward(capture, [RequestExtend("a", NS, prompt, 0, 10, 0)], fill=3.0)
    pin = store.pin(prompt, NS)
    got = store.gather(pin)
    assert pin.coverage.covered == ((0, 10),)
    assert torch.all(got["down"][0] == 3.0) and torch.all(got["down"][1] == 4.0)
    assert capture.status()["tokens_recorded"] == 10


def test_opt_out_and_disabled_record_nothing() -> None:
    capture, store = make()
    run_forward(capture, [RequestExtend("a", NS, list(range(8)), 0, 8, 0, is_recording=False)])
    assert store.status()["pages"] == 0
    off, store_off = make(is_enabled=False)
    run_forward(off, [RequestExtend("a", NS, list(range(8)), 0, 8, 0)])
    assert store_off.status()["pages"] == 0 and not off.status()["enabled"]


def test_exception_disables_recording_and_reports_without_raising() -> None:
    reasons: list[str] = []
    capture, store = make(on_failure=reasons.append)
    prompt = list(range(8))
    capture.begin([RequestExtend("a", NS, prompt, 0, 8, 0)])
    capture.on_output("down", 0, torch.ones(8, 3))  # wrong width: the store's copy raises
    capture.end()
    assert capture.failure is not None and "write down layer 0" in capture.failure
    assert reasons == [capture.failure]
    assert capture.status()["enabled"] is False
    run_forward(capture, [RequestExtend("b", NS, list(range(20, 28)), 0, 8, 0)])
    assert store.status()["pages"] == 0  # stays off


def test_injected_fault_fires_in_the_requested_forward() -> None:
    reasons: list[str] = []
    capture, store = make(on_failure=reasons.append, fault_after_forwards=2)
    run_forward(capture, [RequestExtend("a", NS, list(range(8)), 0, 8, 0)])
    assert capture.failure is None
    run_forward(capture, [RequestExtend("b", NS, list(range(20, 28)), 0, 8, 0)])
    assert capture.failure is not None and "InjectedRecordFault" in capture.failure
    assert len(reasons) == 1


def test_dump_writes_the_stitched_recording(tmp_path) -> None:
    capture, store = make(dump_dir=tmp_path)
    first = list(range(12))
    run_forward(capture, [RequestExtend("a", NS, first, 0, 12, 0)], fill=1.0)
    second = first + [50, 51, 52]
    run_forward(capture, [RequestExtend("b", NS, second, 12, 3, 0)], fill=7.0)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 2
    payload = torch.load(files[-1])
    assert payload["rid"] == "b" and payload["tokens"] == second
    assert payload["covered"] == [(0, 15)]
    down = payload["tensors"]["down"]
    assert down.shape == (2, 15, 8)
    assert torch.all(down[0, :12] == 1.0) and torch.all(down[0, 12:] == 7.0)


def test_forward_that_never_ended_is_discarded_not_published() -> None:
    capture, store = make()
    capture.begin([RequestExtend("a", NS, list(range(8)), 0, 8, 0)])
    capture.on_output("down", 0, torch.ones(8, 8))  # no end(): the forward was cut short
    run_forward(capture, [RequestExtend("b", NS, list(range(20, 28)), 0, 8, 0)])
    assert store.coverage(list(range(8)), NS).covered == ()
    assert store.coverage(list(range(20, 28)), NS).covered == ((0, 8),)
