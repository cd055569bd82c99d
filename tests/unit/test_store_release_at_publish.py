"""Store Note [Store lifetime] through the online loop: a publish frees the recordings of versions
beyond ``train.max_version_lag`` (the hook in ``OnlineLoop._publish``).

The loop is the real one (``build_loop`` over the tiny weights, as in tests/support/loop_rig.py); its
``RecordingSource`` is the server's own ``StoreRecordings`` over a real ``ActivationStore`` holding
HF prefill recordings of the prompts at v0 (the loop's initial adapter), so the step really replays
them before the publish frees them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alchemist_sgl.store.recordings import StoreRecordings
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.config import load_config
from alchemist_sgl.runtime import build_loop
from alchemist_sgl.train import load_fused_weights
from tests.support.loop_rig import (BIG_MS, EOS, TINY_CONFIG, FakeClock, FakeHost, chat,
                                    model_dir, tokenize)
from tests.support.hfref import build_hf_peft, hf_record

torch.set_num_threads(1)
V0 = Namespace("v0")


def _empty_store() -> ActivationStore:
    shape = ModelShape.from_hf_config(
        json.loads((Path(model_dir("tiny")) / "config.json").read_text()), 4)
    plan = choose_plan(shape, "full", page_tokens=16)
    return ActivationStore(plan, host_bytes=64 * plan.slot_bytes, dtype=torch.float32)


def _record(store: ActivationStore, prompts: list[list[int]], adapter) -> None:
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    for i, tokens in enumerate(prompts):
        rec = hf_record(peft_model, torch.tensor(tokens))
        batch = store.open_batch([RequestExtend(f"r{i}", V0, tokens, 0, len(tokens), 0)])
        for name in store.plan.tensors:
            for layer in range(store.plan.shape.layers):
                store.write(batch, name, layer, rec[name][layer])
        store.close_batch(batch)


def _run_idle(loop) -> None:
    for _ in range(50):
        if loop.run_slice(BIG_MS).units == 0:
            return
    raise AssertionError("the loop never went idle")


@pytest.mark.parametrize("max_lag", [0, 1])
def test_publish_frees_versions_beyond_max_version_lag(tmp_path: Path, max_lag: int) -> None:
    config = load_config(TINY_CONFIG, [f"train.checkpoint_dir={tmp_path}", "publish.gate.enabled=false",
                                       f"train.max_version_lag={max_lag}"])
    store, host = _empty_store(), FakeHost()
    training = build_loop(
        config=config, weights=load_fused_weights(model_dir("tiny"), torch.float32), host=host,
        recordings=StoreRecordings(store), completions=None, model_name="tiny", tokenize=tokenize,
        chat=chat, eos_id=EOS, max_tokens=512, serving=lambda: loop.registry.serving.name,
        clock=FakeClock())
    loop, admission = training.loop, training.admission
    trained, waiting = "the trained prompt, recorded at v0", "a completion awaiting feedback"
    _record(store, [tokenize(trained), tokenize(waiting)], loop.trainer.adapter)
    pages = store.status()["pages"]
    assert pages > 0

    def feed(prompt: str, response: str) -> None:
        pending = admission.admit([{"prompt": prompt, "response": response, "rating": "up"}])
        assert loop.queue.offer(pending) == 1

    feed(trained, " yes")
    _run_idle(loop)
    assert host.announced[-1] == "v1"
    assert loop.status()["train"]["replayed_tokens"] == len(tokenize(trained))  # replayed first
    if max_lag == 0:  # v0 is one version behind v1: neither recording can replay again
        assert store.status()["pages"] == 0 and store.status()["released_pages"] == pages
    else:
        assert store.status()["pages"] == pages and store.status()["released_pages"] == 0
        feed("another prompt", " no")
        _run_idle(loop)
        assert host.announced[-1] == "v2"
        assert store.status()["pages"] == 0 and store.status()["released_pages"] == pages
