"""The ``memory`` status block (online/memory_status.py, Note [Memory account, read not estimated])
over a real online loop on the tiny Llama (``build_loop``: tests/support/loop_rig.py), and
the same numbers as ``alchemist_memory_*`` in /metrics (metrics.py). The KV pool is SGLang's in a
server; here a ``KvPoolView`` of given numbers stands for it (its arithmetic is what is tested)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from alchemist_sgl.memory.arbiter import kv_free_fraction
from alchemist_sgl.api.metrics_text import render_alchemist_metrics
from alchemist_sgl.memory.status import KvPoolView, memory_status, storage_bytes
from tests.support.loop_rig import OFFLOAD, PAIRS, TINY_MS, Rig

torch.set_num_threads(1)

KV = KvPoolView(pool_tokens=8192, free_tokens=5000, evictable_tokens=1192, pool_bytes=1 << 20)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _served(rig: Rig) -> list[torch.Tensor]:
    """The tensors the server serves with (integration/ passes the model's parameters)."""
    w = rig.weights
    served = [w.embed, w.final_norm, w.lm_head]
    for lw in w.layers:
        served += [lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_layernorm,
                   lw.post_attention_layernorm]
    return served


def _status(rig: Rig, kv: KvPoolView | None = KV) -> dict:
    return memory_status(device=rig.weights.device, served=_served(rig), master=rig.loop.master,
                         trainer=rig.loop.trainer, kv=kv)


def test_storage_bytes_counts_each_storage_once() -> None:
    a, b = torch.zeros(10, 4), torch.zeros(3, dtype=torch.float64)
    assert storage_bytes([a, a[2:], a.view(40), a.t(), None]) == 160  # views share a's storage
    assert storage_bytes([a, b]) == 160 + 24
    assert storage_bytes([torch.zeros(0)]) == 0


def test_parts_are_the_real_tensors_before_during_and_after_a_step(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", OFFLOAD)
    trainer = rig.loop.trainer
    params = list(trainer.adapter.parameters())
    adapter_bytes = sum(_nbytes(p) for p in params)
    first = _status(rig)
    assert first["measurement"] == "logical-cpu" and "cuda" not in first
    assert first["adapter_bytes"] == adapter_bytes > 0
    assert first["gradient_bytes"] == first["optimizer_bytes"] == 0  # no step yet
    assert first["master_bytes"] == rig.loop.master.bytes > 0
    # The served weights: every projection, norm, embedding and head (a tied head counts once).
    weights = {t.data_ptr(): _nbytes(t) for t in _served(rig)}
    assert first["weights_bytes"] == sum(weights.values()) > 0
    saved = first["saved_tensors"]
    assert saved["device_resident_bytes"] == saved["host_resident_bytes"] == 0
    # Mid-step: forward units ran, their saved tensors are on host, boundaries on the device.
    rig.feed(*PAIRS)
    for _ in range(len(rig.weights.layers)):
        rig.loop.run_slice(TINY_MS)
    mid = _status(rig)
    account = trainer.residency.account
    assert mid["saved_tensors"]["host_resident_bytes"] == account.resident_bytes("host") > 0
    assert mid["saved_tensors"]["device_resident_bytes"] == account.resident_bytes("device") > 0
    while rig.loop.run_slice(TINY_MS).units:
        pass
    after = _status(rig)
    n_params = len(params)
    # AdamW: exp_avg and exp_avg_sq per parameter (its shape and dtype) plus a 0-d fp32 step.
    assert after["optimizer_bytes"] == 2 * adapter_bytes + 4 * n_params
    assert after["gradient_bytes"] == 0  # the optimizer unit sets gradients to None
    assert after["published_adapter_bytes"] == sum(
        _nbytes(t) for t in (*trainer.published.a.values(), *trainer.published.b.values())) > 0
    peaks = after["saved_tensors"]
    assert peaks["device_peak_bytes"] >= mid["saved_tensors"]["device_resident_bytes"]
    assert peaks["moved_to_host_bytes"] == peaks["moved_to_device_bytes"] > 0


def test_gradients_count_while_a_step_accumulates(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("memory.offload=false",))
    rig.feed(PAIRS[0])
    run = rig.loop.trainer.begin_step([rig.loop._to_sample(p) for p in rig.loop.queue.take(1)])
    while run.units < run.units_total - 1:  # all but the optimizer unit
        run.run_unit()
    status = _status(rig, kv=None)
    assert status["gradient_bytes"] == status["adapter_bytes"]  # one grad per parameter
    assert status["saved_tensors"] is None and status["kv"] is None  # no account, no pool


def test_kv_block_counts_evictable_as_available_like_the_arbiter() -> None:
    kv = KV.status()
    assert kv["used_tokens"] == 8192 - 5000 - 1192 == 2000
    assert kv["available_fraction"] == kv_free_fraction(5000, 1192, 8192)
    assert KvPoolView(0, 0, 0).status()["available_fraction"] == 1.0


def test_metrics_show_the_same_numbers(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", OFFLOAD)
    rig.feed(*PAIRS)
    for _ in range(len(rig.weights.layers)):
        rig.loop.run_slice(TINY_MS)
    rig.loop.yield_memory()
    memory = _status(rig)
    text = render_alchemist_metrics({"memory": memory}, {}, {})
    fam = {f.name: f.samples for f in text_string_to_metric_families(text)}
    parts = {s.labels["part"]: s.value for s in fam["alchemist_memory_bytes"]}
    saved = memory["saved_tensors"]
    assert parts == {"weights": memory["weights_bytes"], "master": memory["master_bytes"],
                     "adapter": memory["adapter_bytes"], "gradients": memory["gradient_bytes"],
                     "optimizer": memory["optimizer_bytes"],
                     "published_adapter": memory["published_adapter_bytes"],
                     "saved_device": saved["device_resident_bytes"],
                     "saved_host": saved["host_resident_bytes"], "kv_pool": 1 << 20}
    assert {s.labels["pool"]: s.value for s in fam["alchemist_memory_peak_bytes"]} == {
        "device": saved["device_peak_bytes"], "host": saved["host_peak_bytes"]}
    moved = {s.labels["direction"]: s.value for s in fam["alchemist_memory_moved_bytes"]}
    assert moved == {"to_host": saved["moved_to_host_bytes"],
                     "to_device": saved["moved_to_device_bytes"]}
    assert fam["alchemist_memory_yields"][0].value == saved["yields"] == 1
    assert {s.labels["kind"]: s.value for s in fam["alchemist_memory_kv_tokens"]} == {
        "used": 2000, "free": 5000, "evictable": 1192}
