"""train/graph_rows.py: a PromptGraph rebuilt from the graph plan's rows (the four projections,
attn, lse) and the embedding equals the one recorded from every intermediate of the same forward
(tests/support/graph_record.py runs train/layer.py's layer with hooks on its ops), and a training
step on it equals HF + PEFT (tests/support/hfref.py) on the tiny Llama in fp32."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

from alchemist_sgl.train import Sample  # noqa: E402
from alchemist_sgl.train.graph_backward import GraphRecording  # noqa: E402
from alchemist_sgl.train.graph_rows import GRAPH_ROW_NAMES, rebuild_prompt_graph  # noqa: E402
from alchemist_sgl.train.ops import RopeCache  # noqa: E402
from alchemist_sgl.train.weights import load_fused_weights  # noqa: E402
from tests.support.graph_record import record_prompt_rows  # noqa: E402
from tests.support.hfref import (adapter_grads, hf_grads, ids_of, max_rel_err,  # noqa: E402
                                 model_dir, tiny)
from tests.support.units import make_trainer, published_weights, run_to_optimizer  # noqa: E402

_ = tiny  # the module fixture (fp32 tiny weights, an adapter with B != 0, HF + PEFT over them)
FIELDS = [f for f in GraphRecording.__dataclass_fields__]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a.float() - b.float()).abs().max())


def _check_equal(direct, rebuilt) -> None:
    assert rebuilt.version == direct.version and len(rebuilt.layers) == len(direct.layers)
    for want, got in zip(direct.layers, rebuilt.layers):
        for name in FIELDS:
            assert _max_err(getattr(got, name), getattr(want, name)) <= 1e-6, name


@pytest.mark.parametrize("is_merged", [False, True])
def test_rebuilt_graph_equals_the_recorded_one(tiny, is_merged):
    """With the trainer's unmerged adapter (LoRA terms inside every projection output) and with
    a merged one (W_pub, no LoRA term: a merged server's prefill), rows [0, n) for n = P and a
    shorter n; the rows' ``lse`` also read back from a bit-cast copy in another dtype."""
    weights, adapter, _ = tiny
    w = published_weights(weights, adapter.snapshot()) if is_merged else weights
    trainer = make_trainer(w, adapter)
    prompt = ids_of(300, 23)
    for n in (23, 9):
        direct, rows = record_prompt_rows(w, None if is_merged else trainer.adapter, prompt,
                                          trainer.rope, rows=n)
        assert set(rows) == set(GRAPH_ROW_NAMES)
        _check_equal(direct, rebuild_prompt_graph(w, trainer.rope, prompt, rows, 0))
        bitcast = {**rows, "lse": rows["lse"].view(torch.bfloat16)}  # 2 bf16 per fp32 head
        assert bitcast["lse"].shape[-1] == 2 * weights.spec.heads
        rebuilt = rebuild_prompt_graph(w, trainer.rope, prompt, bitcast, 0)
        assert all(torch.equal(r.lse, d.lse) for r, d in zip(rebuilt.layers, direct.layers))


def test_rebuilt_graph_is_bitwise_in_bf16():
    """In bf16 the rounding matters (the norms keep the rounded sum, normalise the fp32 one):
    the rebuild equals the forward's own intermediates bit for bit, the lse stored bit-cast."""
    w16 = load_fused_weights(model_dir("tiny"), torch.bfloat16)
    rope16 = RopeCache(w16.spec.head_dim, w16.spec.rope_theta, torch.bfloat16, "cpu")
    prompt = ids_of(302, 19)
    direct, rows = record_prompt_rows(w16, None, prompt, rope16)
    assert rows["qkv"].dtype == torch.bfloat16
    rebuilt = rebuild_prompt_graph(w16, rope16, prompt,
                                   {**rows, "lse": rows["lse"].view(torch.bfloat16)}, 0)
    for want, got in zip(direct.layers, rebuilt.layers):
        for name in FIELDS:
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_bad_rows_are_refused(tiny):
    weights, adapter, _ = tiny
    trainer = make_trainer(weights, adapter)
    prompt = ids_of(301, 12)
    _, rows = record_prompt_rows(weights, trainer.adapter, prompt, trainer.rope)
    for bad in ({k: v for k, v in rows.items() if k != "lse"},
                {**rows, "attn": rows["attn"][:, :5]},
                {**rows, "lse": rows["lse"][..., :1]},
                {**rows, "down": rows["down"][:1]}):
        with pytest.raises(ValueError):
            rebuild_prompt_graph(weights, trainer.rope, prompt, bad, 0)
    with pytest.raises(ValueError):  # more rows than prompt tokens
        rebuild_prompt_graph(weights, trainer.rope, prompt[:5], rows, 0)


def test_step_on_rebuilt_graphs_equals_hf(tiny):
    """Lag 0 under a merged adapter, as a live server records: W_pub's forward rows (P and
    P - 1 rows) rebuilt into PromptGraphs; the step runs graph replay for both samples and its
    loss and every LoRA gradient equal HF + PEFT over W0 with the adapter."""
    weights, adapter, peft = tiny
    frozen = adapter.snapshot()
    w_pub = published_weights(weights, frozen)
    trainer = make_trainer(w_pub, adapter, frozen, loss_chunk_rows=4)
    samples = []
    for j, (p, r, n) in enumerate([(25, 8, 25), (14, 5, 13)]):
        prompt, response = ids_of(310 + 2 * j, p), ids_of(311 + 2 * j, r)
        _, rows = record_prompt_rows(w_pub, None, prompt, trainer.rope, rows=n)
        graph = rebuild_prompt_graph(w_pub, trainer.rope, prompt, rows, 0)
        samples.append(Sample(prompt, response, weight=1.0 + j, graph=graph))
    run = trainer.begin_step(samples)
    assert all(p.graph is not None for p in run.plans)
    run_to_optimizer(run)
    grads = {k: None if v is None else v * run.grad_scale
             for k, v in adapter_grads(trainer.adapter).items()}
    run.run_unit()
    ref_loss, ref_grads = hf_grads(peft, [(s.prompt_ids, s.response_ids, s.weight)
                                          for s in samples])
    assert abs(run.loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert max_rel_err(grads, ref_grads) <= 1e-4
