"""online/recorded_sample.py (Note [Graph samples]): a graph-plan recording read from the store
(the real write path, lazy read-out) gives a sample its PromptGraph when rows [0, P - 1) are held
at graph level, equal to the forward's own intermediates, and a step on it equals HF + PEFT; a
prompt with a hole, or a demoted page, replays projections as before (never attn or lse)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

from alchemist_sgl.core.plan import ModelShape, choose_plan  # noqa: E402
from alchemist_sgl.online.intake import PendingSample  # noqa: E402
from alchemist_sgl.online.recorded_sample import build_sample  # noqa: E402
from alchemist_sgl.store import ActivationStore  # noqa: E402
from alchemist_sgl.store.recordings import StoreRecordings  # noqa: E402
from alchemist_sgl.train.spec import PROJECTIONS  # noqa: E402
from tests.support.graph_record import record_prompt_rows  # noqa: E402
from tests.support.hfref import adapter_grads, hf_grads, ids_of, max_rel_err, tiny  # noqa: E402
from tests.support.store_rig import NS, TPAGE, write_extend  # noqa: E402
from tests.support.units import make_trainer, published_weights, run_to_optimizer  # noqa: E402

_ = tiny


def _pending(prompt: list[int], response: list[int]) -> PendingSample:
    return PendingSample(prompt, response, "positive", 1.0, NS.base_version, None, None, 0.0)


def _graph_store(spec, slots: int = 16) -> ActivationStore:
    shape = ModelShape(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.intermediate,
                       spec.layers, 4)
    plan = choose_plan(shape, "graph", page_tokens=TPAGE)
    return ActivationStore(plan, host_bytes=slots * plan.slot_bytes, dtype=torch.float32)


def test_graph_recording_from_the_store_trains_like_hf(tiny):
    weights, adapter, peft = tiny
    frozen = adapter.snapshot()
    w_pub = published_weights(weights, frozen)  # lag 0 under a merged adapter, as served
    trainer = make_trainer(w_pub, adapter, frozen, loss_chunk_rows=4)
    store = _graph_store(weights.spec)
    recordings = StoreRecordings(store)
    full = [int(t) for t in ids_of(400, 2 * TPAGE + 7)]
    holed = [int(t) for t in ids_of(401, 3 * TPAGE + 5)]
    direct, rows = record_prompt_rows(w_pub, None, torch.tensor(full), trainer.rope)
    write_extend(store, "full", full, 0, rows)
    _, hrows = record_prompt_rows(w_pub, None, torch.tensor(holed), trainer.rope)
    write_extend(store, "first", holed[:TPAGE], 0, {k: v[:, :TPAGE] for k, v in hrows.items()})
    write_extend(store, "rest", holed[:3 * TPAGE], 2 * TPAGE, hrows)  # a hole at [16, 32)
    samples, pins = [], []
    for prompt, response in ((full, ids_of(402, 9)), (holed, ids_of(403, 6))):
        pin = recordings.pin(prompt, NS.base_version)
        pins.append(pin)
        samples.append(build_sample(_pending(prompt, [int(t) for t in response]),
                                    recordings.segments(pin), 0, trainer))
    graph, no_graph = samples
    assert no_graph.graph is None and graph.graph is not None
    for s in samples:
        assert all(set(seg.recording.tensors) <= set(PROJECTIONS)
                   for seg in s.segments if seg.recording is not None)
    for want, got in zip(direct.layers, graph.graph.layers):
        for name, a in want.first_rows(len(full) - 1).__dict__.items():
            assert float((getattr(got, name) - a).abs().max()) <= 1e-6, name
    run = trainer.begin_step(samples)
    assert [p.graph is not None for p in run.plans] == [True, False]
    run_to_optimizer(run)
    grads = {k: None if v is None else v * run.grad_scale
             for k, v in adapter_grads(trainer.adapter).items()}
    run.run_unit()
    assert run.finish().graph_samples == 1 and trainer.counters.graph_samples == 1
    ref_loss, ref_grads = hf_grads(peft, [(torch.tensor(s.prompt_ids), torch.as_tensor(s.response_ids),
                                           1.0) for s in samples])
    assert abs(run.loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert max_rel_err(grads, ref_grads) <= 1e-4
    for pin in pins:
        recordings.unpin(pin)


def test_a_demoted_page_leaves_projection_replay(tiny):
    """Pressure demotes the oldest graph pages to ``down``: the prompt loses its graph."""
    weights, adapter, _ = tiny
    trainer = make_trainer(weights, adapter)
    store = _graph_store(weights.spec, slots=3)
    recordings = StoreRecordings(store)
    prompts = [[int(t) for t in ids_of(410 + i, TPAGE + 3)] for i in range(2)]
    for i, prompt in enumerate(prompts):
        _, rows = record_prompt_rows(weights, None, torch.tensor(prompt), trainer.rope)
        write_extend(store, f"r{i}", prompt, 0, rows)
    assert store.status()["demotions"] > 0
    pin = recordings.pin(prompts[0], NS.base_version)
    sample = build_sample(_pending(prompts[0], [5, 6]), recordings.segments(pin), 0, trainer)
    assert sample.graph is None
    assert {n for seg in sample.segments if seg.recording for n in seg.recording.tensors} == {"down"}
    recordings.unpin(pin)


def test_no_graph_is_rebuilt_for_a_trainer_that_takes_none(tiny):
    """Replay off: the sample gets no PromptGraph (the rebuild is skipped), only its segments."""
    weights, adapter, _ = tiny
    trainer = make_trainer(weights, adapter, replay=False)
    assert not trainer.config.replay
    store = _graph_store(weights.spec)
    recordings = StoreRecordings(store)
    prompt = [int(t) for t in ids_of(420, 2 * TPAGE + 3)]
    _, rows = record_prompt_rows(weights, None, torch.tensor(prompt), trainer.rope)
    write_extend(store, "r", prompt, 0, rows)
    pin = recordings.pin(prompt, NS.base_version)
    sample = build_sample(_pending(prompt, [5, 6]), recordings.segments(pin), 0, trainer)
    assert sample.graph is None and any(seg.recording is not None for seg in sample.segments)
    recordings.unpin(pin)
