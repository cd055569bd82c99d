"""The GPU side of recording, as far as a CPU can run it.

record/staging.py (the reused host buffer ring, its plain-copy CPU path; its CUDA path where a
GPU exists), Capture's staged path against its direct path (record/capture.py, Note [Where the
copy goes]), the every-output check (Note [Every planned output, once]), and the startup refusal
of prefill CUDA graphs (integration/environment.py, Note [Eager prefill for recording]).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from alchemist_sgl.config import load_config  # noqa: E402
from alchemist_sgl.errors import ConfigError  # noqa: E402
from alchemist_sgl.integration.environment import (check_recording_flags,  # noqa: E402
                                                   prefill_graph_backend)
from alchemist_sgl.core.prefix import Namespace  # noqa: E402
from alchemist_sgl.record.capture import Capture  # noqa: E402
from alchemist_sgl.core.plan import ModelShape, choose_plan  # noqa: E402
from alchemist_sgl.record.staging import HostStaging  # noqa: E402
from alchemist_sgl.core.records import RequestExtend  # noqa: E402
from alchemist_sgl.store import ActivationStore  # noqa: E402

torch.set_num_threads(1)
NS = Namespace("v0")
SHAPE = ModelShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=3,
                   dtype_bytes=4)


# ---------------------------------------------------------------- HostStaging, CPU path
def collecting(record: list):
    return lambda tag, rows: record.append((tag, rows.clone(), rows.data_ptr()))


def test_cpu_path_is_plain_copies_that_survive_the_source_being_overwritten() -> None:
    got: list = []
    staging = HostStaging(4, torch.float32, "cpu", collecting(got))
    out = torch.arange(24, dtype=torch.float32).view(6, 4)
    expected_slice, expected_index = out[1:4].clone(), out[[0, 5, 2]].clone()
    staging.put("a", out, slice(1, 4))
    staging.put("b", out, torch.tensor([0, 5, 2]))
    out.zero_()  # the caller overwrites its output in place after the hook
    assert got == []  # nothing is handed over before flush while the ring has room
    staging.flush()
    assert [t for t, _, _ in got] == ["a", "b"]
    assert torch.equal(got[0][1], expected_slice) and torch.equal(got[1][1], expected_index)
    status = staging.status()
    assert status["mode"] == "plain-copy" and status["copies"] == 2
    assert not any(b.is_pinned() for b in staging._buffers)
    assert staging._stream is None


def test_ring_is_bounded_retires_oldest_first_and_live_buffers_never_alias() -> None:
    got: list = []
    staging = HostStaging(2, torch.float32, "cpu", collecting(got))
    sources = [torch.full((3, 5), float(i)) for i in range(5)]
    for i, src in enumerate(sources):
        staging.put(i, src, slice(0, 3))
        assert staging.in_flight <= 2
    # 5 puts through 2 buffers: 3 retirements were forced by a full ring, oldest first.
    assert [t for t, _, _ in got] == [0, 1, 2]
    assert staging.ring_full_waits == 3 and staging.status()["buffers"] == 2
    staging.flush()
    # Each copy kept its own values: a buffer shared by two live copies would have mixed them.
    assert [t for t, _, _ in got] == [0, 1, 2, 3, 4]
    for i, (_, rows, _) in enumerate(got):
        assert torch.equal(rows, sources[i])
    # The two in flight at the end sat in different buffers.
    assert got[3][2] != got[4][2]


def test_buffers_are_reused_across_forwards_and_grow_only_when_needed() -> None:
    got: list = []
    staging = HostStaging(3, torch.float32, "cpu", collecting(got))
    for _ in range(2):  # forward 1 allocates, forward 2 reuses
        for width in (4, 8, 2):
            staging.put(width, torch.ones(5, width), slice(0, 5))
        staging.flush()
    first, second = {p for _, _, p in got[:3]}, {p for _, _, p in got[3:]}
    assert second <= first and staging.status()["buffers"] == 3
    assert staging.buffer_growths == 0
    before = staging.capacity_bytes
    staging.put("big", torch.ones(50, 8), slice(0, 50))  # bigger than any buffer: one grows
    staging.flush()
    assert staging.buffer_growths == 1 and staging.capacity_bytes > before
    grown = staging.capacity_bytes
    staging.put("small", torch.ones(2, 2), slice(0, 2))  # fits: no growth
    staging.flush()
    assert staging.buffer_growths == 1 and staging.capacity_bytes == grown
    assert staging.status()["buffers"] == 3


def test_discard_drops_copies_without_the_sink_and_frees_their_buffers() -> None:
    got: list = []
    staging = HostStaging(2, torch.float32, "cpu", collecting(got))
    staging.put("x", torch.ones(2, 2), slice(0, 2))
    staging.put("y", torch.ones(2, 2), slice(0, 2))
    staging.discard()
    assert got == [] and staging.in_flight == 0
    staging.put("z", torch.ones(2, 2), slice(0, 2))
    staging.put("w", torch.ones(2, 2), slice(0, 2))
    assert staging.ring_full_waits == 0  # both buffers were free again


def test_a_failing_sink_still_frees_the_buffer() -> None:
    def sink(tag, rows):
        raise RuntimeError("store broke")

    staging = HostStaging(1, torch.float32, "cpu", sink)
    staging.put("x", torch.ones(2, 2), slice(0, 2))
    with pytest.raises(RuntimeError, match="store broke"):
        staging.flush()
    assert staging.in_flight == 0 and len(staging._free) == 1


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="depth"):
        HostStaging(0, torch.float32, "cpu", lambda t, r: None)
    staging = HostStaging(1, torch.float32, "cpu", lambda t, r: None)
    with pytest.raises(ValueError, match="bfloat16"):
        staging.put("x", torch.ones(2, 2, dtype=torch.bfloat16), slice(0, 2))
    with pytest.raises(ValueError, match="rows, width"):
        staging.put("x", torch.ones(2, 2, 2), slice(0, 2))


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py
def test_cuda_path_pinned_async_copies_see_values_before_in_place_overwrites() -> None:
    got: list = []
    staging = HostStaging(2, torch.float32, "cuda", collecting(got))
    outs = [torch.full((4096, 256), float(i), device="cuda") for i in range(4)]
    for i, out in enumerate(outs):
        staging.put(i, out, slice(0, 4096) if i % 2 else torch.arange(0, 4096, 2, device="cuda"))
        out.mul_(-1)  # an in-place kernel on the forward stream right after the hook
    staging.flush()
    assert all(b.is_pinned() for b in staging._buffers) and staging.status()["mode"] == "pinned-async"
    for i, (_, rows, _) in enumerate(got):
        assert rows.device.type == "cpu" and torch.all(rows == float(i))


# ---------------------------------------------------------------- Capture, staged vs direct
def make(staging: bool | None, depth: int = 2, **kwargs) -> tuple[Capture, ActivationStore]:
    plan = choose_plan(SHAPE, "full", page_tokens=4)
    store = ActivationStore(plan, host_bytes=64 * plan.slot_bytes, device_bytes=3 * plan.slot_bytes,
                            dtype=torch.float32)
    return Capture(store, plan, staging=staging, staging_depth=depth, **kwargs), store


def run_forward(capture: Capture, extends: list[RequestExtend], seed: int,
                skip: tuple[str, int] | None = None) -> None:
    rows = sum(e.extend_len for e in extends)
    gen = torch.Generator().manual_seed(seed)
    capture.begin(extends)
    for layer in range(SHAPE.layers):
        for name, width in capture.plan.widths.items():
            out = torch.randn((rows, width), generator=gen)
            if (name, layer) != skip:
                capture.on_output(name, layer, out)
            out.fill_(float("nan"))  # overwritten in place after the hook


def forwards() -> list[list[RequestExtend]]:
    """Three forwards: an opt-out request between two recorded ones (non-contiguous rows), a
    chunked prompt across two forwards, a radix hit stitched onto the first prompt."""
    a, b, c = list(range(10)), list(range(100, 109)), list(range(200, 222))
    # a's three pages fill the device tier; b and c go to the host tier, x's rows between them.
    return [[RequestExtend("a", NS, a, 0, 10, 0), RequestExtend("b", NS, b, 0, 9, 10),
             RequestExtend("x", NS, list(range(50, 56)), 0, 6, 19, is_recording=False),
             RequestExtend("c", NS, c, 0, 8, 25)],
            [RequestExtend("c", NS, c, 8, 14, 0)],
            [RequestExtend("d", NS, a + [7, 7, 7, 7, 7, 7], 8, 8, 0)]]


def test_staged_path_stores_exactly_what_the_direct_path_stores() -> None:
    results = []
    for staging in (False, True):
        capture, store = make(staging)
        for seed, extends in enumerate(forwards()):
            run_forward(capture, extends, seed)
            capture.end()
        assert capture.failure is None, capture.failure
        prompts = [list(range(10)), list(range(100, 109)), list(range(200, 222)),
                   list(range(10)) + [7] * 6]
        pins = [store.pin(p, NS) for p in prompts]
        results.append(([p.coverage.covered for p in pins], [store.gather(p) for p in pins]))
        assert store.status()["device_bytes"] > 0 and store.status()["host_bytes"] > 0
        if staging:
            status = capture.status()["staging"]
            assert status["mode"] == "plain-copy" and status["ring_full_waits"] > 0
        else:
            assert capture.status()["staging"] is None
    (cov_direct, got_direct), (cov_staged, got_staged) = results
    assert cov_direct == cov_staged and cov_direct[2] == ((0, 22),)
    for direct, staged in zip(got_direct, got_staged):
        for name in direct:
            assert not torch.isnan(staged[name]).any()
            assert torch.equal(direct[name], staged[name]), name


@pytest.mark.parametrize("staging", [False, True])
def test_a_forward_missing_a_planned_output_is_discarded_and_disables_recording(staging) -> None:
    reasons: list[str] = []
    capture, store = make(staging, on_failure=reasons.append)
    prompt = list(range(8))
    run_forward(capture, [RequestExtend("a", NS, prompt, 0, 8, 0)], 0, skip=("gate_up", 2))
    capture.end()
    assert store.coverage(prompt, NS).covered == ()
    assert capture.status()["incomplete_forwards"] == 1 and capture.status()["enabled"] is False
    assert reasons and "11 of the 12 planned" in reasons[0]
    assert "cuda-graph-backend-prefill" in reasons[0]
    if staging:
        assert capture._staging.in_flight == 0  # copies in flight were dropped, not published


def test_a_forward_whose_hooks_never_ran_records_nothing_and_says_why() -> None:
    reasons: list[str] = []
    capture, store = make(None, on_failure=reasons.append)
    capture.begin([RequestExtend("a", NS, list(range(8)), 0, 8, 0)])
    capture.end()  # the projection hooks fired for nothing (a graph replay)
    assert "0 of the 12" in reasons[0] and store.status()["pages"] == 0


def test_prefill_without_hooks_disables_recording_once() -> None:
    reasons: list[str] = []
    capture, _ = make(None, on_failure=reasons.append)
    capture.on_prefill_without_hooks("a prefill batch of 2 requests ran")
    capture.on_prefill_without_hooks("again")
    assert len(reasons) == 1 and "forward hooks did not run" in reasons[0]
    assert capture.status()["enabled"] is False


def test_complete_forwards_are_not_flagged() -> None:
    capture, _ = make(True)
    run_forward(capture, [RequestExtend("a", NS, list(range(8)), 0, 8, 0)], 0)
    capture.end()
    assert capture.failure is None and capture.status()["incomplete_forwards"] == 0


# ---------------------------------------------------------------- startup flags
def cfg(*overrides: str):
    return load_config(None, ["sglang.device=cuda", *overrides])


def test_recording_on_cuda_refuses_the_default_prefill_graph() -> None:
    with pytest.raises(ConfigError) as err:
        check_recording_flags(cfg())
    assert err.value.key == "sglang.cuda-graph-backend-prefill" and "'breakable'" in str(err.value)
    with pytest.raises(ConfigError, match="'full'"):
        check_recording_flags(cfg("sglang.cuda-graph-backend-prefill=full"))


@pytest.mark.parametrize("override", [
    "sglang.cuda-graph-backend-prefill=disabled",
    "sglang.disable-prefill-cuda-graph=true",
    "sglang.disable_cuda_graph=true",
    'sglang.cuda-graph-config={"prefill": {"backend": "disabled"}}',
    "record.enabled=false",
])
def test_recording_on_cuda_accepts_eager_prefill_or_recording_off(override) -> None:
    check_recording_flags(cfg(override))


def test_prefill_backend_follows_sglang_precedence() -> None:
    assert prefill_graph_backend({}) == "breakable"
    # An explicit backend wins over the boolean off-switch; the JSON wins over both.
    assert prefill_graph_backend({"disable-prefill-cuda-graph": True,
                                  "cuda-graph-backend-prefill": "full"}) == "full"
    assert prefill_graph_backend({"cuda_graph_backend_prefill": "breakable",
                                  "cuda-graph-config": '{"prefill": {"backend": "disabled"}}'}
                                 ) == "disabled"
    with pytest.raises(ConfigError, match="not JSON"):
        prefill_graph_backend({"cuda-graph-config": "{nope"})


def test_cpu_runs_are_not_asked_to_change_graph_flags() -> None:
    check_recording_flags(load_config(None, ["sglang.device=cpu"]))
