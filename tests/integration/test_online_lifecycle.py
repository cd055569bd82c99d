"""The online loop across its lifecycle, on dedicated tiny servers: the gate and the non-finite
guard, no update lost in bf16, restart from a checkpoint (graceful and kill -9).

Each test owns its servers (they restart or are configured on purpose) and its checkpoint folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import torch

from alchemist_sgl.config import load_config
from tests.support.loop_rig import expected_merge
from tests.support.online import command, post, post_status, status, train_and_wait
from tests.support.servers import REPO, RunningServer, dedicated_server, start_server

TINY = "configs/cpu-tiny.yaml"


def _sample(i: int) -> dict:
    return {"prompt": f"Question {i}: what colour is the sea?", "response": f" Blue, mostly, case {i}.",
            "rating": "up"}


def _weights(server: RunningServer, name: str) -> dict:
    return torch.load(command(server, "debug.weights", {"name": name})["path"])


def _folder() -> Path:
    return REPO / "var" / "test-runs" / uuid.uuid4().hex[:12] / "checkpoints"


def test_gate_refuses_a_harmful_update_and_nonfinite_steps_are_skipped() -> None:
    overrides = ("train.learning_rate=1.0", "feedback.completion_ttl_s=2")
    with dedicated_server(TINY, overrides,
                          extra_env={"ALCHEMIST_SGL_INJECT_NONFINITE_STEPS": "1"}) as server:
        before = _weights(server, "before.pt")
        s = train_and_wait(server, [_sample(1)])
        assert s["train"]["nonfinite_skipped"] == 1 and s["publish"]["publishes"] == 0
        assert s["weight_version"] == "v0"
        # A learning rate of 1.0 makes updates harmful; the first may still pass the gate on the
        # random-init tiny model, so train until the gate refuses one (bounded).
        for i in range(2, 8):
            before = _weights(server, f"before-{i}.pt")
            serving = status(server)["weight_version"]
            s = train_and_wait(server, [_sample(i)], publishes=1)
            if s["publish"]["rejected"]:
                break
        assert s["publish"]["rejected"] == 1, "the gate refused none of six steps at lr 1.0"
        assert s["weight_version"] == serving, "a rejected candidate is never served"
        rejected = [v for v in s["versions"] if v["state"] == "rejected"]
        assert len(rejected) == 1 and rejected[0]["metric"] is not None
        after = _weights(server, "after.pt")
        for key, tensor in before["live"].items():
            assert torch.equal(after["live"][key], tensor), f"served weights changed at {key}"
        for key, tensor in before["adapter"].items():
            assert torch.equal(after["adapter"][key], tensor), "the trainer returned to the last accepted state"
        # Feedback on a completion older than feedback.completion_ttl_s (2 s here) answers 410.
        reply = post(server, "/v1/chat/completions", {"model": server.model, "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        time.sleep(2.5)
        code, body = post_status(server, "/v1/feedback", {"completion_id": reply["id"], "rating": "up"})
        assert code == 410 and "expired" in json.dumps(body).lower(), body


def test_bf16_live_weights_equal_the_rebuild_from_the_master_after_steps() -> None:
    with dedicated_server(TINY, ("sglang.dtype=bfloat16",)) as server:
        for i in range(3):
            train_and_wait(server, [_sample(i)], publishes=1)
        dump = _weights(server, "bf16.pt")

    lora = load_config(REPO / TINY, ["sglang.dtype=bfloat16"]).train.lora
    adapter = dump["adapter"]
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k), \
        "the adapter was never reset: B carries three steps"
    # The expectation is written out in the test (W0 + s * B @ A per HF module, s = alpha / rank
    # from the config), not the server's own merge.
    master = {(int(k.split(".")[0]), k.split(".")[1]): t for k, t in dump["master"].items()}
    want = expected_merge(master, adapter, lora.alpha / lora.rank, REPO / "var/models/tiny/config.json")
    assert dump["scale"] == lora.alpha / lora.rank
    for key, live in dump["live"].items():
        layer, proj = key.split(".")
        assert live.dtype == torch.bfloat16 and torch.equal(live, want[(int(layer), proj)]), \
            f"{key} lost part of an update"
        assert not torch.equal(live, dump["master"][key])


def _graceful_stop(server: RunningServer) -> None:
    os.kill(server.proc.pid, signal.SIGTERM)  # the main process only: it asks the scheduler to exit
    server.proc.wait(timeout=60)
    server.stop()


def test_restart_continues_the_same_run_and_kill9_loses_only_unsaved_steps() -> None:
    """Three servers. The first trains three steps uninterrupted; its checkpoint folder is copied
    after two (idle, nothing being written: what a stop leaves, as every round is checkpointed);
    then it is killed -9. The second restarts after the kill -9; the third restarts from the copy
    and must train the third step exactly as the uninterrupted run did."""
    base = ("train.replay=false", "train.checkpoint_every_s=0")  # a checkpoint after every round
    folder, copy = _folder(), _folder()
    with dedicated_server(TINY, (*base, f"train.checkpoint_dir={folder}")) as first:
        for i in range(2):
            train_and_wait(first, [_sample(i)], publishes=1)
        at_k = _weights(first, "k.pt")
        serving_k = status(first)["weight_version"]
        shutil.copytree(folder, copy)
        uninterrupted = train_and_wait(first, [_sample(2)], publishes=1)["train"]["last_loss"]
        at_3 = _weights(first, "k3.pt")
        seen = {v["name"] for v in status(first)["versions"]}
        os.killpg(os.getpgid(first.proc.pid), signal.SIGKILL)
        first.proc.wait(timeout=30)
    second = start_server(TINY, (*base, f"train.checkpoint_dir={folder}"))
    try:
        s = status(second)
        assert s["train"]["steps"] == 3, "the checkpoint after step 3 survived kill -9"
        assert s["weight_version"] == at_3["serving"]
        restored = _weights(second, "k3-again.pt")
        for key, tensor in at_3["live"].items():
            assert torch.equal(restored["live"][key], tensor), f"served weights differ at {key}"
        new = train_and_wait(second, [_sample(3)], publishes=1)["weight_version"]
        assert new not in seen and int(new[1:]) > max(int(n[1:]) for n in seen), "ids never repeat"
    finally:
        _graceful_stop(second)
    assert second.proc.returncode is not None, "SIGTERM stopped the server"
    with dedicated_server(TINY, (*base, f"train.checkpoint_dir={copy}")) as again:
        s = status(again)
        assert s["weight_version"] == serving_k and s["train"]["steps"] == 2
        restored = _weights(again, "k2.pt")
        for key, tensor in at_k["live"].items():
            assert torch.equal(restored["live"][key], tensor), f"served weights differ at {key}"
        loss3 = train_and_wait(again, [_sample(2)], publishes=1)["train"]["last_loss"]
        assert abs(loss3 - uninterrupted) <= 1e-6 * abs(uninterrupted), (loss3, uninterrupted)
