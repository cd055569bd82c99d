"""integration/capture_hooks.py without SGLang: batch views from fake ScheduleBatch/ForwardBatch.

The module imports no sglang at import time; these fakes carry only the attributes it reads
(listed in capture_hooks.SGLANG_NAMES and checked against real SGLang by the integration tests).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from alchemist_sgl.integration.capture_hooks import _BatchViewBuilder
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.record.capture import Capture
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.store import ActivationStore

torch.set_num_threads(1)
SHAPE = ModelShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=1,
                   dtype_bytes=4)


class Mode:
    def __init__(self, is_extend: bool) -> None:
        self._is_extend = is_extend

    def is_extend(self) -> bool:
        return self._is_extend


def req(rid: str, tokens: list[int], custom: dict | None = None, lora_id: str | None = None):
    return SimpleNamespace(rid=rid, origin_input_ids=tokens, lora_id=lora_id,
                           sampling_params=SimpleNamespace(custom_params=custom))


def make(is_lora_wrapped: bool = False):
    plan = choose_plan(SHAPE, "full", page_tokens=4)
    store = ActivationStore(plan, host_bytes=32 * plan.slot_bytes, dtype=torch.float32)
    capture = Capture(store, plan)
    return _BatchViewBuilder(capture, lambda: "v7", is_lora_wrapped), capture, store


def forward_batch(reqs, prefix_lens, seq_lens, is_extend=True):
    return SimpleNamespace(forward_mode=Mode(is_extend), rids=[r.rid for r in reqs],
                           extend_prefix_lens_cpu=prefix_lens, extend_seq_lens_cpu=seq_lens)


def test_mixed_batch_views_rows_in_order_and_skips_decode_and_opt_outs() -> None:
    view, _, _ = make()
    a = req("a", list(range(10)))
    b = req("b", list(range(20, 26)), {"alchemist": {"record": False}})
    c = req("c", list(range(30, 35)))  # decoding: its row sits past the prompt
    d = req("d", list(range(40, 48)), {"alchemist": {"store": False}})
    view.set_schedule_batch(SimpleNamespace(reqs=[a, b, c, d]))
    extends = view._extends(forward_batch([a, b, c, d], [0, 0, 5, 0], [10, 6, 1, 8]))
    assert [e.row_offset for e in extends] == [0, 10, 16, 17]
    assert [e.is_recording for e in extends] == [True, False, True, False]
    assert extends[2].recorded_range == (5, 5)  # nothing to record for the decode row
    assert extends[0].namespace.base_version == "v7" and extends[0].namespace.adapter is None


def test_pre_forward_ignores_decode_and_records_extend() -> None:
    view, capture, store = make()
    a = req("a", list(range(8)))
    view.set_schedule_batch(SimpleNamespace(reqs=[a]))
    view.pre_forward(None, (None, None, forward_batch([a], [0], [1], is_extend=False)), {})
    assert not capture.is_recording
    view.pre_forward(None, (None, None), {"forward_batch": forward_batch([a], [0], [8])})
    assert capture.is_recording
    for name, width in capture.plan.widths.items():
        capture.on_output(name, 0, torch.ones(8, width))
    view.post_forward(None, (), None)
    assert store.coverage(a.origin_input_ids, Namespace("v7")).covered == ((0, 8),)


def test_lora_wrapped_projections_record_only_base_requests() -> None:
    view, _, _ = make(is_lora_wrapped=True)
    a, b = req("a", list(range(8))), req("b", list(range(8)), lora_id="adapter-1")
    view.set_schedule_batch(SimpleNamespace(reqs=[a, b]))
    extends = view._extends(forward_batch([a, b], [0, 0], [8, 8]))
    assert [e.is_recording for e in extends] == [True, False]


def test_a_broken_batch_disables_recording_without_raising() -> None:
    view, capture, _ = make()
    broken = SimpleNamespace(forward_mode=Mode(True), rids=["x"], extend_prefix_lens_cpu=[0],
                             extend_seq_lens_cpu=None)
    view.set_schedule_batch(SimpleNamespace(reqs=[SimpleNamespace(rid="x")]))
    view.pre_forward(None, (None, None, broken), {})  # seq lens missing: nothing to do
    assert capture.failure is None
    weird = SimpleNamespace(forward_mode=None, rids=["x"])  # raises inside: caught
    view.pre_forward(None, (None, None, weird), {})
    assert capture.failure is not None and "reading the batch" in capture.failure


class PrefillMode(Mode):
    def __init__(self, is_extend: bool, is_target_verify: bool = False) -> None:
        super().__init__(is_extend)
        self._is_target_verify = is_target_verify

    def is_target_verify(self) -> bool:
        return self._is_target_verify


def test_a_prefill_batch_that_never_reached_the_model_hooks_disables_recording() -> None:
    view, capture, _ = make()
    a = req("a", list(range(8)))
    decode = SimpleNamespace(forward_mode=PrefillMode(False), reqs=[a])
    verify = SimpleNamespace(forward_mode=PrefillMode(True, is_target_verify=True), reqs=[a])
    view.check_prefill_reached_hooks(decode, view.extend_forwards)  # decode graphs: fine
    view.check_prefill_reached_hooks(verify, view.extend_forwards)  # speculative verify: fine
    assert capture.failure is None
    prefill = SimpleNamespace(forward_mode=PrefillMode(True), reqs=[a])
    seen = view.extend_forwards
    view.set_schedule_batch(prefill)
    view.pre_forward(None, (None, None), {"forward_batch": forward_batch([a], [0], [8])})
    for name, width in capture.plan.widths.items():
        capture.on_output(name, 0, torch.ones(8, width))
    view.post_forward(None, (), None)
    view.check_prefill_reached_hooks(prefill, seen)  # the hooks ran: fine
    assert capture.failure is None and capture.forwards_recorded == 1
    view.check_prefill_reached_hooks(prefill, view.extend_forwards)  # ran as a graph replay
    assert capture.failure is not None and "forward hooks did not run" in capture.failure
    assert capture.status()["incomplete_forwards"] == 1
