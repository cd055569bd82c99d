"""Saved-tensor offload (offload.py, Note [Saved-tensor offload]) and the memory account
(residency.py, Note [Logical device pool]) on the tiny Llama with real weights and recordings.

The driver below runs a step the way the work units do (units.py, Note [Work units]): one autograd
graph per decoder layer, starting from detached, grad-requiring copies of both streams, the head,
then one backward per layer, top down. It calls the real layer code (forward.py); only the
sequencing is written here, so offload can be switched on and off around identical arithmetic.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

from alchemist_sgl.config import LoraConfig, TrainConfig  # noqa: E402
from alchemist_sgl.train import ReplayTrainer, load_fused_weights  # noqa: E402
from alchemist_sgl.train.forward import (_LayerLora, decoder_layer, embed_segments,  # noqa: E402
                                         head_logprobs)
from alchemist_sgl.train.objectives import token_loss_sum  # noqa: E402
from alchemist_sgl.train.offload import SavedTensorOffload, long_lived_tensors  # noqa: E402
from alchemist_sgl.train.residency import DeviceBudgetExceeded, ResidencyAccount  # noqa: E402
from tests.support.hfref import (adapter_grads, build_hf_peft, model_dir,  # noqa: E402
                                 random_adapter)
from tests.support.hfref import CASES, build_samples  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    weights = load_fused_weights(model_dir("tiny"))
    adapter = random_adapter(weights.spec, rank=4, seed=20)
    samples, _ = build_samples(CASES["hole_in_middle"] + CASES["full_varied_lengths"],
                        build_hf_peft(model_dir("tiny"), torch.float32, adapter))
    return weights, adapter, samples


def _trainer(weights, adapter, layout: str = "segments", **cfg_kw) -> ReplayTrainer:
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), learning_rate=5e-3, **cfg_kw)
    trainer = ReplayTrainer(weights, cfg, layout=layout)
    trainer.adapter.load_state_dict(adapter.state_dict())
    return trainer


def _leaves(streams):
    return [None if t is None else t.detach().requires_grad_() for t in streams]


def _grads(streams):
    return [None if t is None or not t.requires_grad else t.grad for t in streams]


def _step(trainer: ReplayTrainer, samples, off: SavedTensorOffload | None, *,
          is_prefetching: bool = True, moved: list | None = None):
    """Loss and LoRA gradients of one SFT step run layer by layer; ``off`` tracks and moves the
    saved tensors of every layer unit (None: no hooks at all). ``moved``: receives, per offload,
    (bytes the offloader says it moved, fall of the account's device pool)."""
    t, w, layers = trainer, trainer.weights, trainer.weights.spec.layers
    plans = [t.plan(s) for s in samples]
    mean_weight = sum(p.sample.weight for p in plans) / len(plans)
    t.adapter.zero_grad(set_to_none=True)
    if off is not None:
        off.protect(long_lived_tensors(t))
    losses = []
    with torch.enable_grad():
        for si, planned in enumerate(plans):
            hidden = list(embed_segments(w, planned))
            residual = [None] * len(hidden)
            graphs = []
            for layer in range(layers):
                if layer > 0:
                    hidden, residual = _leaves(hidden), _leaves(residual)
                lora = _LayerLora(t.adapter, layer, True, w.dtype)
                if off is None:
                    h_out, r_out = decoder_layer(w, layer, lora, planned, t.rope, hidden, residual)
                else:
                    with off.saving((si, layer)):
                        h_out, r_out = decoder_layer(w, layer, lora, planned, t.rope, hidden,
                                                     residual)
                    off.keep((si, layer), [*hidden, *residual, *h_out, *r_out])
                    before = off.account.resident_bytes("device")
                    n = off.offload((si, layer))
                    if moved is not None:
                        moved.append((n, before - off.account.resident_bytes("device")))
                graphs.append((hidden, residual, h_out, r_out))
                hidden, residual = h_out, r_out
            top_h, top_r = _leaves(hidden), _leaves(residual)
            lo, hi = planned.prompt_len - 1, planned.input_ids.numel() - 1
            n_resp = hi - lo
            scale = planned.sample.weight / mean_weight / len(plans)
            loss = token_loss_sum(planned.sample.kind, "unlikelihood", head_logprobs(
                w, planned, top_h, top_r, lo, hi)) * (scale / n_resp)
            loss.backward()
            losses.append(loss.detach())
            grads_h, grads_r = _grads(top_h), _grads(top_r)
            for layer in reversed(range(layers)):
                if off is not None and is_prefetching:
                    off.prefetch((si, layer))
                    off.prefetch((si, layer - 1))  # one layer ahead
                ins_h, ins_r, outs_h, outs_r = graphs[layer]
                pairs = [(o, g) for o, g in zip(outs_h + outs_r, grads_h + grads_r)
                         if g is not None and o is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                grads_h, grads_r = _grads(ins_h), _grads(ins_r)
                graphs[layer] = None
                if off is not None:
                    off.release((si, layer))
    grads = {k: v.clone() for k, v in adapter_grads(t.adapter).items()}
    t.adapter.zero_grad(set_to_none=True)
    return torch.stack(losses).sum(), grads


def _assert_bitwise(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_offload_changes_nothing_but_memory(tiny):
    """Loss and every LoRA gradient, fp32, bitwise: no hooks vs tracking only vs offloading
    (with prefetch, and with every reload left to the unpack)."""
    weights, adapter, samples = tiny
    trainer = _trainer(weights, adapter)
    plain = _step(trainer, samples, None)
    assert all(g is not None and g.abs().sum() > 0 for g in plain[1].values())
    tracked = SavedTensorOffload(ResidencyAccount("cpu"), is_enabled=False)
    _assert_bitwise(plain, _step(trainer, samples, tracked))
    off = SavedTensorOffload(ResidencyAccount("cpu"))
    _assert_bitwise(plain, _step(trainer, samples, off))
    assert off.account.moved_to_host_bytes > 0 and off.late_reloads == 0
    assert off.account.moved_to_device_bytes == off.account.moved_to_host_bytes
    late = SavedTensorOffload(ResidencyAccount("cpu"))
    _assert_bitwise(plain, _step(trainer, samples, late, is_prefetching=False))
    assert late.late_reloads > 0
    for o in (tracked, off, late):  # everything released: nothing left in either pool
        assert o.account.resident_bytes("device") == o.account.resident_bytes("host") == 0


def _saved_storages(trainer: ReplayTrainer, sample):
    """Independently of offload.py: the distinct storages autograd saves in each layer's forward
    of ``sample`` that are neither long-lived nor a boundary stream; {layer: bytes}."""
    t, w = trainer, trainer.weights
    planned = t.plan(sample)
    protected = {x.untyped_storage().data_ptr() for x in long_lived_tensors(t)}
    out, keep_alive = {}, []
    with torch.enable_grad():
        hidden = list(embed_segments(w, planned))
        residual = [None] * len(hidden)
        for layer in range(w.spec.layers):
            if layer > 0:
                hidden, residual = _leaves(hidden), _leaves(residual)
            seen = {}

            def pack(x):
                st = x.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
                keep_alive.append(x)
                return x

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                h_out, r_out = decoder_layer(w, layer, _LayerLora(t.adapter, layer, True, w.dtype),
                                             planned, t.rope, hidden, residual)
            boundary = {x.untyped_storage().data_ptr()
                        for x in [*hidden, *residual, *h_out, *r_out] if x is not None}
            out[layer] = sum(n for p, n in seen.items() if p not in protected | boundary)
            hidden, residual = h_out, r_out
    return out


def test_account_measures_the_mechanism(tiny):
    """The device pool falls, at each offload, by exactly the bytes moved, which are the bytes of
    the layer's saved storages found by an independent hook; with offload off the peak is higher."""
    weights, adapter, samples = tiny
    trainer = _trainer(weights, adapter)
    sample = samples[0]
    expected = _saved_storages(trainer, sample)
    moved: list[tuple[int, int]] = []
    on = SavedTensorOffload(ResidencyAccount("cpu"))
    _step(trainer, [sample], on, moved=moved)
    assert [n for n, _ in moved] == [expected[layer] for layer in sorted(expected)]
    assert all(n > 0 and fall == n for n, fall in moved)
    off = SavedTensorOffload(ResidencyAccount("cpu"), is_enabled=False)
    _step(trainer, [sample], off)
    peak_on, peak_off = on.account.peak_bytes("device"), off.account.peak_bytes("device")
    assert peak_off > peak_on > 0
    # Without offload, every layer's saved storages are resident at once before the backward.
    assert peak_off >= sum(expected.values())
    assert on.account.peak_bytes("host") >= max(expected.values())
    assert off.account.peak_bytes("host") == 0


def test_offload_all_moves_units_layer_zero_first(tiny):
    """A yield: every tracked unit moves to host in forward order, and reloads bitwise."""
    weights, adapter, samples = tiny
    trainer = _trainer(weights, adapter)
    w, planned = trainer.weights, trainer.plan(samples[0])
    off = SavedTensorOffload(ResidencyAccount("cpu"), is_enabled=True)
    off.protect(long_lived_tensors(trainer))
    moved_order = []
    orig_offload = off.offload

    def spy(key):
        n = orig_offload(key)
        moved_order.append((key, n))
        return n

    off.offload = spy
    with torch.enable_grad():
        hidden, residual = list(embed_segments(w, planned)), [None] * len(planned.segments)
        for layer in range(w.spec.layers):
            with off.saving((0, layer)):
                hidden, residual = decoder_layer(w, layer, _LayerLora(trainer.adapter, layer, True,
                                                                      w.dtype),
                                                 planned, trainer.rope, hidden, residual)
    resident = off.account.resident_bytes("device")
    total = off.offload_all()
    assert [k for k, _ in moved_order] == [(0, layer) for layer in range(w.spec.layers)]
    assert total > 0 and off.account.resident_bytes("device") == resident - total
    assert off.account.resident_bytes("host") >= total
    off.release_all()
    assert off.account.resident_bytes("device") == off.account.resident_bytes("host") == 0


def test_device_limit_raises_and_registers_nothing():
    account = ResidencyAccount("cpu", device_limit_bytes=1000)
    a, b = torch.empty(200, dtype=torch.float32), torch.empty(100, dtype=torch.float32)
    account.add("device", a.untyped_storage())
    with pytest.raises(DeviceBudgetExceeded):
        account.add("device", b.untyped_storage())
    assert account.resident_bytes("device") == 800
    account.add("device", a[10:].untyped_storage())  # the same storage counts once
    assert account.resident_bytes("device") == 800 and account.peak_bytes("device") == 800
    account.remove("device", a.untyped_storage())
    assert account.resident_bytes("device") == 800
    account.remove("device", a.untyped_storage())
    assert account.resident_bytes("device") == 0 and account.peak_bytes("device") == 800
    assert account.status()["measurement"] == "logical-cpu"
    with pytest.raises(ValueError):
        ResidencyAccount("cpu", device_limit_bytes=0)


def _steprun_grads(trainer: ReplayTrainer, samples):
    """Loss and LoRA gradients of the real StepRun (units.py): every unit but the optimizer's,
    which would change the adapter (the loss is the total the optimizer unit would take)."""
    run = trainer.begin_step(samples)
    while run.units < run.units_total - 1:
        run.run_unit()
    grads = {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()}
    trainer.adapter.zero_grad(set_to_none=True)
    return torch.stack(run._losses).sum(), grads


@pytest.mark.parametrize("layout,loss_chunk_rows", [("joint", 256), ("joint", 4),
                                                    ("segments", 256)])
def test_steprun_with_offload_is_bitwise_the_step_without(tiny, layout, loss_chunk_rows):
    """Through the real work units (memory.offload sets ``trainer.residency``) vs None."""
    weights, adapter, samples = tiny
    trainer = _trainer(weights, adapter, layout=layout)
    trainer.loss_chunk_rows = loss_chunk_rows
    trainer.residency = None
    plain = _steprun_grads(trainer, samples)
    off = SavedTensorOffload(ResidencyAccount("cpu"))
    trainer.residency = off
    _assert_bitwise(plain, _steprun_grads(trainer, samples))
    assert off.account.moved_to_host_bytes > 0 and off.late_reloads == 0
    assert off.account.moved_to_device_bytes == off.account.moved_to_host_bytes
    assert off.account.resident_bytes("device") == off.account.resident_bytes("host") == 0
    # A step abandoned mid-forward leaves units tracked; the next step starts from none.
    run = trainer.begin_step(samples)
    for _ in range(weights.spec.layers // 2):
        run.run_unit()
    assert off.account.resident_bytes("host") > 0
    _assert_bitwise(plain, _steprun_grads(trainer, samples))
    assert off.account.resident_bytes("device") == off.account.resident_bytes("host") == 0


def test_steprun_offload_under_compile_is_bitwise(tiny):
    """Note [Saved tensors under compile]: compiled layers (train.compile) with offload on vs off."""
    weights, adapter, samples = tiny
    from torch._dynamo.utils import counters

    prefix_covered = samples[1:3]  # a hole in the prompt would run eager (layer.py)
    trainer = _trainer(weights, adapter, layout="joint", compile=True)
    trainer.residency = None
    from tests.support.layer_calls import layer_calls

    with layer_calls() as calls:
        plain = _steprun_grads(trainer, prefix_covered)
    # the layers really ran compiled (counted around layer.py's choice; dynamo's own capture
    # counter does not move when an earlier test in the same process already compiled these graphs)
    assert calls["compiled"] > 0
    graphs = counters["stats"]["unique_graphs"]
    off = SavedTensorOffload(ResidencyAccount("cpu"))
    trainer.residency = off
    _assert_bitwise(plain, _steprun_grads(trainer, prefix_covered))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile under the hooks
    assert off.account.moved_to_host_bytes > 0
    assert off.account.resident_bytes("device") == off.account.resident_bytes("host") == 0
