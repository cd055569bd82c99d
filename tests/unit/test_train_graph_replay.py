"""Graph replay in the training step (train/graph_layer.py, Note [Graph replay]) against HF + PEFT.

A sample carries a ``PromptGraph`` (tests/support/graph_record.py records it from train/layer.py's
own layer, as a prefill would); the step's work units then run no layer op for its prompt rows
[0, P - 1) and build their backward from the recording. The reference is HF transformers + PEFT
over the whole sample (tests/support/hfref.py), fp32 on the tiny Llama: loss and every LoRA
gradient within 1e-4 relative. Samples without a usable graph recording take the old path.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

from alchemist_sgl.config import LoraConfig, TrainConfig  # noqa: E402
from alchemist_sgl.train import ReplayTrainer, Sample  # noqa: E402
from alchemist_sgl.train.graph_layer import graph_layer  # noqa: E402
from alchemist_sgl.train.offload import SavedTensorOffload  # noqa: E402
from alchemist_sgl.train.residency import ResidencyAccount  # noqa: E402
from alchemist_sgl.train.samples import PromptGraph  # noqa: E402
from tests.support.graph_record import record_prompt  # noqa: E402
from tests.support.hfref import (adapter_grads, covered_sample, hf_grads, hf_record,  # noqa: E402
                                 ids_of, max_rel_err, tiny)
from tests.support.layer_calls import layer_calls  # noqa: E402
from tests.support.units import make_trainer, published_weights, run_to_optimizer  # noqa: E402

_ = tiny  # the module fixture (fp32 tiny weights, an adapter with B != 0, HF + PEFT over them)
TOL_FP32 = 1e-4


def _graph_sample(trainer, prompt, response, rows=None, version=0, weight=1.0) -> Sample:
    graph = record_prompt(trainer.weights, trainer.adapter, prompt, trainer.rope, rows=rows,
                          version=version)
    return Sample(prompt, response, weight=weight, graph=graph)


def _step(trainer, samples):
    """(run, loss, LoRA grads normalised as the optimizer unit applies them) of a unit step."""
    run = trainer.begin_step(samples)
    run_to_optimizer(run)
    grads = {k: None if v is None else v * run.grad_scale
             for k, v in adapter_grads(trainer.adapter).items()}
    run.run_unit()
    return run, run.loss, grads


def _check_hf(peft, samples, loss, grads):
    ref_loss, ref_grads = hf_grads(peft, [(torch.as_tensor(s.prompt_ids),
                                           torch.as_tensor(s.response_ids), s.weight)
                                          for s in samples])
    assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss)
    assert max_rel_err(grads, ref_grads) <= TOL_FP32


@pytest.mark.parametrize("layout", ["joint", "segments"])
def test_graph_samples_equal_hf(tiny, layout):
    """Fully graph-recorded samples (a 2-token prompt: one recorded row; a one-token response;
    head chunks smaller than the response): loss and every LoRA grad equal HF + PEFT, and the
    old layer path (layer.py's ``_core_for``) never runs."""
    weights, adapter, peft = tiny
    trainer = make_trainer(weights, adapter, layout=layout, loss_chunk_rows=4)
    shapes = [(21, 7), (2, 5), (33, 1)]
    samples = [_graph_sample(trainer, ids_of(40 + 2 * j, p), ids_of(41 + 2 * j, r), weight=1.0 + j)
               for j, (p, r) in enumerate(shapes)]
    with layer_calls() as calls:
        run, loss, grads = _step(trainer, samples)
    assert calls == {"compiled": 0, "eager": 0}
    assert all(p.graph is not None for p in run.plans)
    assert run.counts.replayed_tokens == sum(p - 1 for p, _ in shapes)
    assert run.counts.recomputed_tokens == len(shapes)
    _check_hf(peft, samples, loss, grads)


def test_mixed_batch_equals_hf(tiny):
    """A graph-recorded sample beside a projection-recorded one (partial coverage), one with no
    recording, and one whose graph recording covers too few rows: only the first takes graph
    replay, the others today's path; the batch's loss and grads equal HF + PEFT."""
    weights, adapter, peft = tiny
    trainer = make_trainer(weights, adapter, loss_chunk_rows=4)
    graph = _graph_sample(trainer, ids_of(60, 26), ids_of(61, 9), weight=2.0)
    prompt = ids_of(62, 50)
    partial = covered_sample(prompt, ids_of(63, 10), [(0, 32, True), (32, 50, False)],
                             hf_record(peft, prompt), weight=1.0)
    zero = Sample(ids_of(64, 30), ids_of(65, 8), weight=0.5)
    short = _graph_sample(trainer, ids_of(66, 24), ids_of(67, 6), rows=12, weight=1.5)
    samples = [graph, partial, zero, short]
    with layer_calls() as calls:
        run, loss, grads = _step(trainer, samples)
    assert [p.graph is not None for p in run.plans] == [True, False, False, False]
    assert calls["eager"] == 3 * weights.spec.layers  # the three old-path samples, per layer
    assert run.counts.replayed_tokens == 25 + 32
    _check_hf(peft, samples, loss, grads)


class _ForwardOps(TorchDispatchMode):
    """The rows of every base projection forward (x @ W^T: a product with a base weight operand
    in transposed strides) and the query rows of every attention kernel run inside the block."""

    def __init__(self, weights) -> None:
        super().__init__()
        base = [t for lw in weights.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        self.ptrs = {w.data_ptr(): w.stride() for w in base}
        self.projection_rows: list[int] = []
        self.attention_rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        is_attention = "scaled_dot_product" in name or "flash" in name
        if is_attention and "backward" not in name:
            self.attention_rows.append(int(args[0].shape[-2]))  # q [B, H, n, d]
        if name.split(".")[0] in ("mm", "addmm"):
            ts = [t for t in args if isinstance(t, torch.Tensor) and t.dim() == 2]
            x, w = ts[-2], ts[-1]
            if w.data_ptr() in self.ptrs and w.stride() != self.ptrs[w.data_ptr()]:
                self.projection_rows.append(int(x.shape[0]))
        return func(*args, **(kwargs or {}))


def test_graph_sample_runs_no_prompt_forward(tiny):
    """For a graph sample the only base projection forwards and attention kernels of the whole
    step are the live rows' [P - 1, P + R): R + 1 query rows each, four projections and one
    attention per layer. The same detector sees all P + R rows in the old path."""
    weights, adapter, _ = tiny
    trainer = make_trainer(weights, adapter, loss_chunk_rows=4)
    p_len, r_len = 23, 6
    sample = _graph_sample(trainer, ids_of(80, p_len), ids_of(81, r_len))
    with _ForwardOps(weights) as ops:
        _step(trainer, [sample])
    layers = weights.spec.layers
    assert ops.projection_rows == [r_len + 1] * (4 * layers)
    assert ops.attention_rows == [r_len + 1] * layers
    with _ForwardOps(weights) as old:
        _step(make_trainer(weights, adapter, loss_chunk_rows=4), [Sample(ids_of(80, p_len),
                                                                         ids_of(81, r_len))])
    assert old.projection_rows == [p_len + r_len] * (4 * layers)
    assert old.attention_rows and set(old.attention_rows) == {p_len + r_len}


def test_dropout_takes_the_old_path(tiny):
    """LoRA dropout cannot be replayed (its masks are not recorded): the planner leaves the
    sample on today's path (the step runs the old layer every layer), and ``graph_layer``
    refuses to run with dropout."""
    weights, adapter, _ = tiny
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1), learning_rate=5e-3)
    trainer = ReplayTrainer(weights, cfg)
    trainer.adapter.load_state_dict(adapter.state_dict())
    sample = _graph_sample(trainer, ids_of(90, 20), ids_of(91, 5))
    with layer_calls() as calls:
        run, loss, _ = _step(trainer, [sample])
    assert run.plans[0].graph is None and calls["eager"] == weights.spec.layers
    assert run.counts.replayed_tokens == 0 and loss > 0
    planned = make_trainer(weights, adapter).plan(sample)
    assert planned.graph is not None
    trainer.adapter.train()
    with pytest.raises(ValueError, match="dropout"):
        graph_layer(trainer.layer_context(), 0, trainer.adapter, planned,
                    torch.zeros(6, weights.spec.hidden), None, None)


def test_stale_and_malformed_graph_recordings(tiny):
    """Beyond ``max_version_lag`` a graph recording is counted stale and the sample recomputed;
    one from the future, with the wrong layer count or rows beyond the prompt is refused."""
    weights, adapter, _ = tiny
    trainer = make_trainer(weights, adapter, max_version_lag=1)
    trainer.version = 5
    prompt, response = ids_of(70, 12), ids_of(71, 4)
    stale = _graph_sample(trainer, prompt, response, version=3)
    planned = trainer.plan(stale)
    assert planned.graph is None and planned.counts.stale_recomputes == 1
    assert trainer.plan(_graph_sample(trainer, prompt, response, version=4)).graph is not None
    with pytest.raises(ValueError, match="newer"):
        trainer.plan(_graph_sample(trainer, prompt, response, version=6))
    graph = stale.graph
    assert graph is not None
    with pytest.raises(ValueError, match="layers"):
        trainer.plan(Sample(prompt, response, graph=PromptGraph(4, graph.layers[:-1])))
    with pytest.raises(ValueError, match="rows"):
        trainer.plan(Sample(prompt[:10], response, graph=PromptGraph(4, graph.layers)))


def test_graph_step_with_saved_tensor_offload(tiny):
    """With the saved-tensor offload on, a graph sample's step gives bitwise the gradients of
    the same step without it (only the live rows' saved tensors are tracked and moved)."""
    weights, adapter, _ = tiny
    plain = make_trainer(weights, adapter, loss_chunk_rows=4)
    samples = [_graph_sample(plain, ids_of(100, 27), ids_of(101, 8)),
               Sample(ids_of(102, 15), ids_of(103, 5))]
    _, loss0, grads0 = _step(plain, samples)
    off = SavedTensorOffload(ResidencyAccount("cpu"))
    trainer = make_trainer(weights, adapter, loss_chunk_rows=4)
    trainer.residency = off
    _, loss1, grads1 = _step(trainer, samples)
    assert loss1 == loss0 and off.account.moved_to_host_bytes > 0
    assert all(torch.equal(grads1[k], g) for k, g in grads0.items())


def test_lag0_merged_graph_equals_hf(tiny):
    """Merge mode at lag 0 (forward.py, Note [Published adapter]): the base tensors are W_pub =
    cast(W0 + s*B@A) of the trained adapter, the graph recording is the merged model's own
    (W_pub x, no LoRA term, as a merged server's prefill computes it), the backward takes the
    lag-0 form; loss and grads equal HF + PEFT over W0 with the adapter."""
    weights, adapter, peft = tiny
    frozen = adapter.snapshot()
    w_pub = published_weights(weights, frozen)
    trainer = make_trainer(w_pub, adapter, frozen, loss_chunk_rows=4)
    assert trainer.is_published_current
    prompt, response = ids_of(110, 25), ids_of(111, 8)
    graph = record_prompt(w_pub, None, prompt, trainer.rope)
    samples = [Sample(prompt, response, graph=graph), Sample(ids_of(112, 14), ids_of(113, 5))]
    run, loss, grads = _step(trainer, samples)
    assert run.plans[0].graph is not None
    _check_hf(peft, samples, loss, grads)


@pytest.mark.parametrize("objective", ["unlikelihood", "kto"])
def test_negative_objectives_equal_old_path(tiny, objective):
    """Negative samples (objectives.py) with graph replay equal the same samples on today's path
    (itself checked against HF + PEFT in test_train_units.py), KTO without reference log-probs
    included (its no-grad reference pass takes today's path)."""
    weights, adapter, _ = tiny

    def trainer_():
        trainer = make_trainer(weights, adapter, loss_chunk_rows=3, objective_negative=objective)
        trainer._kl_ema = 0.3  # a non-zero KL estimate enters KTO's loss
        return trainer

    trainer = trainer_()
    shapes = [(20, 11, "negative"), (15, 9, "positive")]
    plain = [Sample(ids_of(120 + j, p), ids_of(130 + j, r), kind=kind, weight=2.0 - j)
             for j, (p, r, kind) in enumerate(shapes)]
    graphed = [Sample(s.prompt_ids, s.response_ids, kind=s.kind, weight=s.weight,
                      graph=record_prompt(weights, trainer.adapter, s.prompt_ids, trainer.rope))
               for s in plain]
    _, loss0, grads0 = _step(trainer, plain)
    run, loss1, grads1 = _step(trainer_(), graphed)
    assert all(p.graph is not None for p in run.plans)
    assert abs(loss1 - loss0) <= 2e-5 * abs(loss0)
    assert max_rel_err(grads1, grads0) <= 2e-5


def test_whole_sample_path_ignores_the_graph(tiny):
    """``ReplayTrainer.accumulate`` (the whole-sample forward) computes a graph sample's prompt as
    today (graph replay is wired into the work units only) and still equals HF + PEFT."""
    weights, adapter, peft = tiny
    trainer = make_trainer(weights, adapter)
    samples = [_graph_sample(trainer, ids_of(140, 18), ids_of(141, 6))]
    trainer.adapter.zero_grad(set_to_none=True)
    with layer_calls() as calls:
        loss, counts, _ = trainer.accumulate(samples)
    assert calls["eager"] == weights.spec.layers and counts.replayed_tokens == 17
    _check_hf(peft, samples, loss, adapter_grads(trainer.adapter))
