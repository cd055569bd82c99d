"""The ``graph`` plan in the ``replay`` experiment: its store round trip (fp32 lse written bit-cast
into a bf16 pool, ``debug.recording``'s export giving the fp32 values back), its timed arm's
sample building (the online loop's ``build_sample`` over the benchmark's in-process store: a
``PromptGraph`` equal to the forward's own, planned as graph replay, a step equal to HF + PEFT),
its FLOPs share (the whole forward of the P - 1 replayed rows) and its ceiling (= ideal)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from alchemist_sgl.core.plan import GRAPH_TENSORS, TENSOR_ORDER, ModelShape, forward_flops_per_token  # noqa: E402
from alchemist_sgl.record.export import export_recording  # noqa: E402
from eval.experiments import _replay_arms as arms, _replay_hf as hf, _replay_live as live  # noqa: E402
from eval.experiments import _replay_metrics as m  # noqa: E402
from eval.experiments import replay  # noqa: E402
from tests.support.graph_record import record_prompt_rows  # noqa: E402
from tests.support.hfref import ids_of, max_rel_err, tiny  # noqa: E402
from tests.support.units import make_trainer  # noqa: E402

_ = tiny
SMOL = ModelShape(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, layers=30, dtype_bytes=4)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _export(prompt: list[int], rows: dict[str, torch.Tensor], cut: int) -> dict:
    """A ``debug.recording``-shaped export of fully covered rows, in two segments."""
    return {"tokens": prompt, "namespace": ["v0", None], "covered": [[0, len(prompt)]],
            "segments": [(0, cut, {k: v[:, :cut] for k, v in rows.items()}),
                         (cut, len(prompt), {k: v[:, cut:] for k, v in rows.items()})]}


def test_plans_name_core_graph_tensors() -> None:
    assert replay.PLANS["graph"] == GRAPH_TENSORS and replay.PLANS["full"] == TENSOR_ORDER


def test_bf16_lse_is_stored_bit_cast_and_exported_as_fp32_values(tmp_path) -> None:
    shape = ModelShape(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=192, layers=3, dtype_bytes=2)
    gen = torch.Generator().manual_seed(3)
    prompt = list(range(200, 237))
    widths = {"qkv": 128, "o": 64, "gate_up": 384, "down": 64, "attn": 64}
    rows = {k: torch.randn(3, 37, w, generator=gen).to(torch.bfloat16) for k, w in widths.items()}
    rows["lse"] = torch.randn(3, 37, 4, generator=gen) * 7.0  # fp32 values, not bf16-representable
    assert not torch.equal(rows["lse"], rows["lse"].to(torch.bfloat16).float())
    store, ns = live.fill_store([_export(prompt, rows, 32)], shape, GRAPH_TENSORS, torch.bfloat16)
    pin = store.pin(prompt, ns)
    (start, end, held), = store.segments(pin)  # copies, as the store keeps them
    store.unpin(pin)
    assert (start, end) == (0, 37) and held["lse"].dtype == torch.bfloat16 and held["lse"].shape[-1] == 8
    assert torch.equal(held["lse"].view(torch.float32), rows["lse"])
    out = export_recording(store, prompt, ns, tmp_path / "r.pt")
    got = torch.load(out["path"], weights_only=True)
    back = live.rows_of(got, GRAPH_TENSORS)
    assert back["lse"].dtype == torch.float32 and torch.equal(back["lse"], rows["lse"])
    for k in widths:
        assert torch.equal(back[k], rows[k]), k
    with pytest.raises(ValueError):  # bit-cast bf16 lse handed in as if values
        live.fill_store([_export(prompt, {**rows, "lse": held["lse"]}, 32)], shape, GRAPH_TENSORS,
                        torch.bfloat16)


def test_graph_arm_samples_are_built_by_the_loop_and_train_like_hf(tiny) -> None:
    weights, adapter, peft = tiny
    trainer = make_trainer(weights, adapter)
    spec = weights.spec
    shape = ModelShape(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.intermediate, spec.layers, 4)
    texts = [([int(t) for t in ids_of(410, 41)], [int(t) for t in ids_of(411, 9)]),
             ([int(t) for t in ids_of(412, 32)], [int(t) for t in ids_of(413, 5)])]
    exports, direct = [], []
    for prompt, _ in texts:
        graph, rows = record_prompt_rows(weights, adapter, torch.tensor(prompt), trainer.rope)
        direct.append(graph)
        exports.append(_export(prompt, rows, 16))
    store, ns = live.fill_store(exports, shape, GRAPH_TENSORS, torch.float32)

    def build():
        made = [live.sample_from_store(store, ns, a, b, 0, trainer) for a, b in texts]
        return [s for s, _ in made], lambda: [store.unpin(pin) for _, pin in made]

    samples, release = build()
    for (prompt, _), want, s in zip(texts, direct, samples):
        assert s.graph is not None and s.graph.version == 0
        assert all(set(seg.recording.tensors) <= set(TENSOR_ORDER) for seg in s.segments if seg.recording)
        for a, b in zip(want.layers, s.graph.layers):
            for name, t in vars(a.first_rows(len(prompt) - 1)).items():
                assert float((getattr(b, name) - t).abs().max()) <= 1e-6, name
    release()
    replayed, graphs = arms.planned_counts(trainer, build)
    assert graphs == 2 and replayed == [len(a) - 1 for a, _ in texts]
    got = arms.step_grads(trainer, build)
    ref = hf.reference_grads(peft, texts)  # the benchmark's own HF + PEFT reference (its loss)
    assert max_rel_err(got, ref) <= 1e-4
    assert arms.peak_saved_bytes(trainer, [build], set()) > 0


def test_graph_flops_share_is_the_whole_forward_of_the_replayed_rows() -> None:
    samples = [(400, 100, 399), (410, 100, 409)]
    f, f_tokens = m.prompt_fractions(SMOL, GRAPH_TENSORS, samples, 49152, 16, TARGETS)
    lora = m.lora_flops_per_token(SMOL, 16, TARGETS)
    saved = sum(n * forward_flops_per_token(SMOL, n) for _, _, n in samples)
    total = sum((p + r) * (forward_flops_per_token(SMOL, p + r) + lora) + r * 2 * 576 * 49152
                for p, r, _ in samples)
    assert f == pytest.approx(saved / total, rel=1e-12)
    assert f_tokens == pytest.approx(808 / 1010)
    full = m.prompt_fractions(SMOL, TENSOR_ORDER, samples, 49152, 16, TARGETS)[0]
    assert full < f < f_tokens  # more than the projections; never the LoRA, LM head or response


def test_graph_ceiling_is_its_ideal_ratio() -> None:
    times = {"replay": [1.0, 1.2, 0.9], "recompute": [2.0, 2.1, 2.2]}
    kw = dict(tokens=100, times=times, forward_share=0.5, fractions=(0.6, 0.8), errors=(1e-6, 1e-6),
              peak=(1, 2), stale={1: 0.99})
    out = m.plan_fields(ceiling="ideal", **kw)
    assert out["ceiling_ratio"] == out["ideal_ratio"] == pytest.approx(1 / (1 - 0.3))
    assert out["ceiling_source"] == "ideal_ratio"
    assert m.plan_fields(ceiling=[1.2, 1.3, 1.4], **kw)["ceiling_source"] == "substituted_rows"
    with pytest.raises(ValueError):
        m.plan_fields(ceiling="measured", **kw)


def test_bf16_graph_arm_samples_rebuild_bit_for_bit() -> None:
    """bf16 (the benchmark's second dtype): fp32 lse values through the bf16 store and the loop's
    build give the forward's own PromptGraph bit for bit, planned as graph replay."""
    from alchemist_sgl.train import ReplayTrainer, load_fused_weights
    from tests.support.hfref import model_dir
    from tests.support.units import train_cfg

    w16 = load_fused_weights(model_dir("tiny"), torch.bfloat16)
    trainer = ReplayTrainer(w16, train_cfg())  # a fresh adapter (B = 0): W0's rows are exact
    spec = w16.spec
    shape = ModelShape(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.intermediate, spec.layers, 2)
    prompt, response = [int(t) for t in ids_of(420, 37)], [int(t) for t in ids_of(421, 6)]
    direct, rows = record_prompt_rows(w16, None, torch.tensor(prompt), trainer.rope)
    assert rows["lse"].dtype == torch.float32 and rows["qkv"].dtype == torch.bfloat16
    store, ns = live.fill_store([_export(prompt, rows, 32)], shape, GRAPH_TENSORS, torch.bfloat16)
    sample, pin = live.sample_from_store(store, ns, prompt, response, 0, trainer)
    try:
        assert sample.graph is not None and trainer.plan(sample).counts.graph_samples == 1
        for want, got in zip(direct.layers, sample.graph.layers):
            for name, t in vars(want.first_rows(len(prompt) - 1)).items():
                assert torch.equal(getattr(got, name), t), name
    finally:
        store.unpin(pin)
