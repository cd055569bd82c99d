"""The composition root (runtime.py ``build_runtime``) without SGLang: the tiny Llama's weights
and a fake scheduler view stand in for what integration/training.py hands it.

Checks that one call builds every part, wired to each other (the poller and the loop share the
queue and the sample fates; the loop reports feedback to the poller), with its status sections and
control commands; that training off builds none of it; and that a part failing to build disables
its feature while the runtime still serves status.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from alchemist_sgl.api.control import ControlQueue
from alchemist_sgl.config import Config, load_config
from alchemist_sgl.memory.arbiter import ServingPressure
from alchemist_sgl.memory.status import KvPoolView
from alchemist_sgl.record.capture import Capture
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.core.plan_auto import PlanChoice
from alchemist_sgl.runtime import RuntimeState, SchedulerInfo, ServedModel, build_runtime
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.store.recordings import StoreRecordings
from alchemist_sgl.train import load_fused_weights
from tests.support.loop_rig import EOS, TINY_CONFIG, chat, model_dir, tokenize

torch.set_num_threads(1)

INFO = SchedulerInfo(pid=7, device="cpu", model_name="tiny", model_path="tiny")
CALM = ServingPressure(0, 0, 0, 1.0, 0)
KV = KvPoolView(pool_tokens=1024, free_tokens=1000, evictable_tokens=24, pool_bytes=1 << 16)


class StateHost:
    """``ServingHost`` as integration/training.py's: announcing writes the shared state."""

    def __init__(self, state: RuntimeState) -> None:
        self.state = state

    def can_publish(self) -> bool:
        return True

    def announce(self, version: str) -> None:
        self.state.weight_version = version


def _config(tmp: Path, *overrides: str) -> Config:
    return load_config(TINY_CONFIG, [f"train.checkpoint_dir={tmp / 'ckpt'}",
                                     f"feedback.db_path={tmp / 'feedback.sqlite'}",
                                     f"server.cache_dir={tmp / 'var' / 'cache'}",
                                     "publish.gate.enabled=false",
                                     "server.enable_debug_commands=true", *overrides])


def _served(state: RuntimeState) -> ServedModel:
    return ServedModel(
        weights=load_fused_weights(model_dir("tiny"), torch.float32), parameters=(),
        host=StateHost(state), tokenize=tokenize, chat=chat, eos_id=EOS, max_tokens=512,
        pressure=lambda: CALM, kv_pool=lambda: KV, storage=lambda: {"is_shared": True})


def test_one_call_builds_every_part_wired_together(tmp_path: Path) -> None:
    state = RuntimeState(weight_version="not announced yet")
    queue = ControlQueue(tmp_path / "control.sqlite")
    runtime = build_runtime(_config(tmp_path, "memory.enabled=true"), INFO, state, control=queue,
                            recording=None, served=_served(state))
    training = runtime.training
    assert training is not None and runtime.loop is training.loop
    loop, poller = training.loop, training.feedback
    assert poller is not None and loop.feedback is poller
    assert poller.queue is loop.queue and poller.fates is loop.fates
    assert poller.admission is training.admission and poller.completions is runtime.completions
    assert state.weight_version == "v0"  # the restore announced v0 through the host
    assert runtime.arbiter is not None and runtime.pressure is not None
    status = runtime.status()
    for section in ("train", "publish", "versions", "memory", "arbiter"):
        assert section in status and "error" not in status[section], (section, status[section])
    assert status["weight_version"] == "v0" and status["train"]["steps"] == 0
    assert status["memory"]["kv"]["pool_tokens"] == KV.pool_tokens
    assert "record" not in status and status["disabled"] == {}
    pause, storage = queue.submit("train.pause", {}), queue.submit("debug.storage", {})
    samples = queue.submit("train.samples", {"samples": [
        {"prompt": "Hello", "response": "Hi there", "rating": "up"}]})
    assert runtime.process_commands() == 3
    assert queue.result(pause).result == {"paused": True} and loop.is_paused
    assert queue.result(storage).result == {"is_shared": True}
    assert queue.result(samples).result == {"accepted": 1, "samples_pending": 1}
    assert len(loop.queue) == 1 and loop.fates.fed == 1


def test_training_off_builds_no_loop_and_no_training_status(tmp_path: Path) -> None:
    state = RuntimeState()
    runtime = build_runtime(_config(tmp_path, "memory.enabled=false"), INFO, state,
                            control=None, recording=None, served=None)
    assert runtime.training is None and runtime.loop is None and runtime.arbiter is None
    status = runtime.status()
    assert not {"train", "publish", "versions", "memory", "arbiter"} & set(status)
    runtime.on_train_slot(is_busy=False)  # nothing to run, nothing raised
    assert not runtime.has_training_work()


def test_a_part_that_fails_to_build_disables_training_only(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("a file where the checkpoint folder should be")
    state = RuntimeState()
    runtime = build_runtime(_config(tmp_path), INFO, state, control=None, recording=None,
                            served=_served(state))
    assert runtime.loop is None and runtime.training is None
    reason = runtime.status()["disabled"]["train"]
    assert reason.startswith("install failed: FileExistsError")
    assert runtime.status()["version"]  # status still answers


@dataclass(frozen=True)
class InstalledRecording:
    """What integration/capture_hooks.py ``install`` hands the root, minus the hooks."""

    capture: Capture
    store: ActivationStore
    choice: PlanChoice


def test_recording_feeds_status_and_the_loop_reads_its_store(tmp_path: Path) -> None:
    shape = ModelShape.from_hf_config(
        json.loads((Path(model_dir("tiny")) / "config.json").read_text()), 4)
    plan = choose_plan(shape, "full", page_tokens=16)
    store = ActivationStore(plan, host_bytes=64 * plan.slot_bytes, dtype=torch.float32)
    state = RuntimeState()
    recording = InstalledRecording(Capture(store, plan), store, PlanChoice(plan, "record.plan"))
    runtime = build_runtime(_config(tmp_path), INFO, state, control=None, recording=recording,
                            served=_served(state))
    assert runtime.loop is not None
    source = runtime.loop.recordings
    assert isinstance(source, StoreRecordings) and source.store is store
    status = runtime.status()
    assert status["record_plan"] == {**plan.as_status(), "chosen_by": {"rule": "record.plan"}}
    assert status["store"] == store.status()
    assert status["record"] == recording.capture.status()
