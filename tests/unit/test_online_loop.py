"""OnlineLoop end to end over the real tiny Llama weights, without SGLang.

The loop is built by ``runtime.build_loop`` (the composition root's) from ``configs/cpu-tiny.yaml`` (checkpoints in a
tmp folder), over fp32 weights loaded from the tiny model folder; the publisher writes into those
very tensors, which stand for the served model's parameters. The only fake is ``FakeHost`` (the
``ServingHost`` protocol: records announcements, ``can_publish`` toggled by the test) and a fake
clock for ``train.round_s`` (the rig: tests/support/loop_rig.py). The served weights are checked
against W0 + s * B @ A written out in the rig (``expected_merge``), not against the production
merge (serving at v means cast(W0 + s * B_v @ A_v)).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from pathlib import Path

import pytest
import torch

from alchemist_sgl.errors import CheckpointIncompatible
from tests.support.loop_rig import (BIG_MS, EOS, SAMPLES, TINY_MS, Rig, adam_state, adapter_state,
                                    b_norm, checkpoint_now, same, same_adam, tokenize)

torch.set_num_threads(1)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "ckpt")


# ---------------------------------------------------------------- work units, publish, carry-on
def test_step_runs_in_units_and_publishes_the_merge_from_master(rig: Rig) -> None:
    loop = rig.loop
    assert rig.host.announced == ["v0"]  # build_loop restored nothing and announced v0
    assert same(rig.live(), rig.w0)
    assert all(torch.equal(loop.master.tensors[i][p], rig.w0[(i, p)]) for i, p in rig.w0)
    a0 = adapter_state(loop)

    rig.feed(SAMPLES[0])
    reports = []
    while loop.counters.publishes < 1:
        reports.append(loop.run_slice(TINY_MS))
        assert len(reports) < 200
    layers = rig.weights.spec.layers
    # One unit per slice at most; a step (forward + backward per layer, head, optimizer) and its
    # publish (one build unit per layer, commit, ...) take many slices.
    assert max(r.units for r in reports) == 1
    assert sum(r.units for r in reports) >= 2 * layers + 2 + layers
    st = rig.status()
    assert st["train"]["steps"] == 1
    assert st["train"]["units_run"] == sum(r.units for r in reports)
    assert st["train"]["slices"] == sum(1 for r in reports if r.units)
    assert {"train", "publish.build", "publish.commit"} <= set(st["train"]["max_unit_ms_by_kind"])
    assert rig.host.announced == ["v0", "v1"]
    assert loop.registry.serving.name == "v1" and loop.registry.get("v1").parent == "v0"

    live1 = rig.live()
    assert b_norm(loop) > 0
    assert same(live1, rig.expected_live())
    assert not same(live1, rig.w0)
    a1 = adapter_state(loop)

    rig.feed(SAMPLES[1])
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1", "v2"]
    assert rig.status()["train"]["steps"] == 2
    assert rig.status()["train"]["units_run"] > sum(r.units for r in reports)
    live2 = rig.live()
    assert same(live2, rig.expected_live())
    assert not same(live2, live1)
    # The adapter carries on across publishes: AdamW counted two steps, and A moved at step 2
    # (at step 1 B was 0, so A's gradient was 0; a per-publish reset would leave A at its init).
    assert b_norm(loop) > 0
    steps = {int(s["step"]) for s in adam_state(loop)}
    assert steps == {2}
    a_keys = [k for k in a0 if "lora_A" in k]
    assert all(torch.equal(a0[k], a1[k]) for k in a_keys)
    assert any(not torch.equal(a1[k], adapter_state(loop)[k]) for k in a_keys)


def test_publish_waits_while_the_host_refuses_then_commits(rig: Rig) -> None:
    loop = rig.loop
    rig.host.is_open = False
    rig.feed(SAMPLES[0])
    for _ in range(5):
        loop.run_slice(BIG_MS)
    assert loop.run_slice(BIG_MS).units == 0  # waits, runs nothing
    st = rig.status()
    assert st["train"]["steps"] == 1 and st["publish"]["publishes"] == 0
    assert st["train"]["state"] == "publishing"
    # The round's samples are counted by lag with the step, not after its publish: a status read
    # while the publish waits shows both counters moved (eval online's windows read them together).
    assert st["train"]["samples_trained"] == sum(st["train"]["samples_trained_by_lag"].values()) == 1
    assert loop.has_step_in_progress
    assert rig.host.announced == ["v0"]
    assert loop.registry.serving.name == "v0"
    assert same(rig.live(), rig.w0)

    rig.host.is_open = True
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1"]
    assert rig.status()["publish"]["publishes"] == 1
    assert rig.status()["train"]["state"] == "idle"
    assert same(rig.live(), rig.expected_live()) and not same(rig.live(), rig.w0)


# ---------------------------------------------------------------- pause (rounds: test_online_rounds.py)
def test_pause_stops_new_steps(rig: Rig) -> None:
    loop = rig.loop
    rig.feed(SAMPLES[0])
    assert loop.has_work
    loop.is_paused = True
    assert not loop.has_work
    assert loop.run_slice(BIG_MS).units == 0
    st = rig.status()
    assert st["train"]["state"] == "paused" and st["train"]["paused"] is True
    assert st["train"]["steps"] == 0 and st["train"]["samples_pending"] == 1
    loop.is_paused = False
    assert loop.has_work
    rig.run_idle()
    assert loop.trainer.counters.steps == 1 and rig.host.announced == ["v0", "v1"]


def test_pause_mid_sample_finishes_that_sample_and_keeps_the_round_open(rig: Rig) -> None:
    """Note [Rounds]: a pause keeps the round open at the same version; resume closes it."""
    loop = rig.loop
    rig.feed(SAMPLES[0], SAMPLES[1])  # round_max_samples 1: a round per sample
    for _ in range(3):
        loop.run_slice(TINY_MS)
    assert loop.has_step_in_progress and loop.trainer.counters.steps == 0
    loop.is_paused = True
    assert not loop.has_work
    for _ in range(50):
        loop.run_slice(BIG_MS)
    assert not loop.has_step_in_progress and len(loop.queue) == 1
    st = rig.status()["train"]
    assert st["samples_in_round"] == 1 and st["round"]["version"] == "v0" and st["steps"] == 0
    assert rig.host.announced == ["v0"]
    loop.is_paused = False
    rig.run_idle()
    assert loop.trainer.counters.steps == 2 and rig.host.announced == ["v0", "v1", "v2"]


def test_a_tiny_slice_still_runs_one_unit(rig: Rig) -> None:
    rig.feed(SAMPLES[0])
    assert rig.loop.has_work
    assert rig.loop.run_slice(1e-9).units == 1


# ---------------------------------------------------------------- rollback
def test_rollback_mints_a_new_id_with_v1s_weights_adapter_and_adamw(rig: Rig) -> None:
    loop = rig.loop
    rig.feed(SAMPLES[0])
    rig.run_idle()
    live_v1, adapter_v1, adam_v1 = rig.live(), adapter_state(loop), adam_state(loop)
    for s in SAMPLES[1:3]:
        rig.feed(s)
        rig.run_idle()
    assert rig.host.announced == ["v0", "v1", "v2", "v3"]
    assert not same(rig.live(), live_v1)

    out = loop.rollback("v1")
    assert out["weight_version"] == "v4" and out["parent"] == "v1"
    v4 = loop.registry.get("v4")
    assert v4.parent == "v1" and v4.state == "serving" and v4.step == loop.registry.get("v1").step
    assert loop.registry.get("v3").state == "retired"
    assert rig.host.announced[-1] == "v4"
    assert same(rig.live(), live_v1)
    assert all(torch.equal(adapter_v1[k], v) for k, v in adapter_state(loop).items())
    assert same_adam(adam_state(loop), adam_v1)

    with pytest.raises(KeyError):
        loop.rollback("v99")
    with pytest.raises(KeyError):
        loop.rollback("latest")
    assert loop.registry.serving.name == "v4"

    rig.feed(SAMPLES[3])
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1", "v2", "v3", "v4", "v5"]
    assert loop.registry.get("v5").parent == "v4"
    assert {int(s["step"]) for s in adam_state(loop)} == {2}  # v1's AdamW state went on
    names = [v.name for v in loop.registry.page(100)]
    assert len(names) == len(set(names)) == 6 and loop.registry.next_id == 6


def test_rollback_to_v0_serves_w0_with_a_fresh_adapter(rig: Rig) -> None:
    loop = rig.loop
    adapter0 = adapter_state(loop)
    rig.feed(SAMPLES[0])
    rig.run_idle()
    assert not same(rig.live(), rig.w0)
    out = loop.rollback("v0")
    assert out["weight_version"] == "v2" and out["parent"] == "v0"
    assert loop.registry.get("v2").parent == "v0"
    assert same(rig.live(), rig.w0)
    assert all(torch.equal(adapter0[k], v) for k, v in adapter_state(loop).items())
    assert adam_state(loop) == []
    assert rig.host.announced == ["v0", "v1", "v2"]


def test_rollback_refused_while_the_host_refuses_and_mid_step_requeues(rig: Rig) -> None:
    loop = rig.loop
    rig.feed(SAMPLES[0])
    rig.run_idle()
    live_v1 = rig.live()
    rig.feed(SAMPLES[1])
    for _ in range(3):
        loop.run_slice(TINY_MS)
    assert loop.has_step_in_progress and len(loop.queue) == 0
    rig.host.is_open = False
    with pytest.raises(RuntimeError):
        loop.rollback("v1")
    assert loop.registry.serving.name == "v1" and loop.has_step_in_progress
    rig.host.is_open = True
    assert loop.rollback("v1")["weight_version"] == "v2"
    assert not loop.has_step_in_progress
    assert len(loop.queue) == 1  # the abandoned step's sample is back in the queue
    assert loop.queue.take(1)[0].prompt_ids == tokenize(SAMPLES[1][0])
    assert same(rig.live(), live_v1)
    assert loop.trainer.counters.steps == 1


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_resumes_the_same_training(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    overrides = ("train.replay=false",)
    first = Rig(folder, overrides)
    first.feed(SAMPLES[0])
    first.run_idle()
    first.feed(SAMPLES[1])  # pending at the checkpoint
    checkpoint_now(first.loop)
    live_at_ckpt = first.live()
    assert not same(live_at_ckpt, first.w0)
    first.run_idle()  # the first loop trains on the pending sample: v2
    loss_first = first.loop.counters.last_loss
    assert first.host.announced == ["v0", "v1", "v2"]

    second = Rig(folder, overrides)  # a fresh W0; build_loop restores the checkpoint
    assert same(second.w0, first.w0)
    assert second.loop.restore() is True
    assert same(second.live(), live_at_ckpt)
    assert second.loop.registry.serving.name == "v1"
    assert second.host.announced[-1] == "v1"
    assert len(second.loop.queue) == 1
    queued = second.loop.queue.take(1)
    assert queued[0].prompt_ids == tokenize(SAMPLES[1][0])
    assert queued[0].response_ids == tokenize(SAMPLES[1][1]) + [EOS]
    second.loop.queue.requeue_front(queued)
    assert second.loop.trainer.counters.steps == 1

    second.run_idle()
    loss_second = second.loop.counters.last_loss
    assert loss_first is not None and loss_second is not None
    assert loss_second == pytest.approx(loss_first, rel=1e-6)
    # The file knew v2 (published by the first loop after the checkpoint): never handed out again.
    assert second.host.announced[-1] == "v3"
    assert second.loop.registry.get("v2").state == "retired"


def test_incompatible_checkpoint_names_the_rank(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    first = Rig(folder)
    first.feed(SAMPLES[0])
    first.run_idle()
    checkpoint_now(first.loop)
    with pytest.raises(CheckpointIncompatible) as info:
        Rig(folder, ("train.lora.rank=8",))
    assert info.value.fields == ("rank",)
    assert "rank" in str(info.value)


# ---------------------------------------------------------------- gate
def _heldout(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in
                              [("What is 3+3?", "6"), ("Greet me", "Good morning!")]) + "\n")
    return path


def test_gate_rejects_a_harmful_step(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("publish.gate.enabled=true",
                                  f"publish.gate.heldout_path={_heldout(tmp_path)}",
                                  "train.learning_rate=1.0", "publish.gate.max_regression=0"))
    loop = rig.loop
    assert len(loop.gate_pairs) == 2
    adapter0 = adapter_state(loop)
    rig.feed(SAMPLES[0])
    rig.run_idle()
    st = rig.status()
    assert st["train"]["steps"] == 1
    assert st["publish"]["rejected"] == 1 and st["publish"]["publishes"] == 0
    v1 = loop.registry.get("v1")
    assert v1.state == "rejected" and v1.metric is not None
    assert loop.registry.v0_metric() is not None and v1.metric > loop.registry.v0_metric()
    assert loop.registry.serving.name == "v0" and rig.host.announced == ["v0"]
    assert same(rig.live(), rig.w0)
    assert all(torch.equal(adapter0[k], v) for k, v in adapter_state(loop).items())
    assert adam_state(loop) == []
    assert loop.trainer.published is None
    with pytest.raises(ValueError):
        loop.rollback("v1")  # never served


def test_gate_rejection_keeps_cumulative_train_counters(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("publish.gate.enabled=true",
                                  f"publish.gate.heldout_path={_heldout(tmp_path)}",
                                  "train.learning_rate=1.0", "publish.gate.max_regression=0"))
    rig.feed(SAMPLES[0])
    rig.run_idle()
    st = rig.status()["train"]
    assert rig.status()["publish"]["rejected"] == 1 and st["steps"] == 1
    assert st["samples_trained"] == 1
    assert st["tokens_trained"] > 0


def test_gate_accepts_a_mild_step_with_a_metric(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("publish.gate.enabled=true",
                                  f"publish.gate.heldout_path={_heldout(tmp_path)}",
                                  "publish.gate.max_regression=10",
                                  "publish.gate.max_regression_total=10"))
    loop = rig.loop
    rig.feed(SAMPLES[0])
    rig.run_idle()
    st = rig.status()
    assert st["publish"]["publishes"] == 1 and st["publish"]["rejected"] == 0
    v1 = loop.registry.get("v1")
    assert v1.state == "serving" and isinstance(v1.metric, float)
    assert loop.registry.v0_metric() is not None
    assert "gate" in st["train"]["max_unit_ms_by_kind"]
    assert rig.host.announced == ["v0", "v1"]
    assert same(rig.live(), rig.expected_live()) and not same(rig.live(), rig.w0)


# ---------------------------------------------------------------- non-finite guard
def test_nonfinite_attempt_is_skipped_and_nothing_is_published(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", inject_nonfinite_steps=frozenset({1}))
    loop = rig.loop
    adapter0 = adapter_state(loop)
    rig.feed(SAMPLES[0])
    rig.run_idle()
    st = rig.status()
    assert st["train"]["nonfinite_skipped"] == 1 and st["train"]["steps"] == 0
    assert loop.counters.attempts == 1
    assert st["publish"]["publishes"] == 0 and rig.host.announced == ["v0"]
    assert same(rig.live(), rig.w0)
    assert all(torch.equal(adapter0[k], v) for k, v in adapter_state(loop).items())
    assert adam_state(loop) == []

    rig.feed(SAMPLES[1])  # attempt 2 is not poisoned
    rig.run_idle()
    assert loop.counters.attempts == 2 and loop.trainer.counters.steps == 1
    assert rig.host.announced == ["v0", "v1"]
    assert same(rig.live(), rig.expected_live()) and not same(rig.live(), rig.w0)
