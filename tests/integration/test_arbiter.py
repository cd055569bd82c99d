"""The memory arbiter on a live tiny server: a burst of requests arrives while training runs; no
request fails, training yields within the burst and resumes after it, and status and metrics show
the transitions. With ``memory.offload`` on, the ``memory`` block shows the saved tensors moving
and the KV pool, the arbiter sees the scheduler's TTFT, and /metrics has the same numbers. (The
policy is trace-tested in tests/unit/test_memory_arbiter.py, the yield's move and the block's
parts in tests/unit/test_memory_yield.py and test_memory_status.py.)"""

from __future__ import annotations

import json
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.online import post, status, wait_for
from tests.support.servers import dedicated_server

OVERRIDES = ("memory.enabled=true", "memory.waiting_requests_high=2", "memory.min_dwell_s=0.5",
             "memory.arrival_rate_high_per_s=null", "memory.ttft_target_ms=null",
             "sglang.max-running-requests=2", "publish.gate.enabled=false", "memory.offload=true")


def test_training_yields_to_a_burst_and_resumes() -> None:
    with dedicated_server("configs/cpu-tiny.yaml", OVERRIDES) as server:
        assert status(server)["arbiter"]["state"] == "TRAINING"
        samples = [{"prompt": f"Fact {i}: water is", "response": " wet and clear.", "rating": "up"}
                   for i in range(40)]
        post(server, "/alchemist/train/samples", {"samples": samples})
        wait_for(server, lambda s: s["train"]["steps"] >= 2, what="training under way")
        failures: list[str] = []

        def one(i: int) -> None:
            body = {"model": server.model, "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Burst request {i}: count slowly to ten."}]}
            req = urllib.request.Request(f"{server.base_url}/v1/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as resp:
                    if resp.status != 200:
                        failures.append(str(resp.status))
            except Exception as exc:  # every failure is counted
                failures.append(repr(exc))

        burst = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in burst:
            t.start()
        seen = set()
        while any(t.is_alive() for t in burst):
            seen.add(status(server)["arbiter"]["state"])
        for t in burst:
            t.join()
        after_burst = status(server)
        assert failures == []
        assert "YIELDING" in seen or "PAUSED" in seen or after_burst["arbiter"]["transitions"] >= 1, seen
        end = wait_for(server, lambda s: s["arbiter"]["state"] == "TRAINING"
                       and s["train"]["steps"] > after_burst["train"]["steps"], what="training resumed")
        assert end["arbiter"]["transitions"] >= 2 and end["arbiter"]["last_transition_at"] is not None
        memory = end["memory"]
        saved, kv = memory["saved_tensors"], memory["kv"]
        assert memory["measurement"] == "logical-cpu"
        assert memory["weights_bytes"] > memory["master_bytes"] > 0  # the master: targets only
        assert memory["optimizer_bytes"] > 2 * memory["adapter_bytes"] > 0  # AdamW moments + steps
        assert saved["moved_to_host_bytes"] > 0 and saved["late_reloads"] == 0
        print("memory:", json.dumps({k: memory[k] for k in ("saved_tensors", "kv")}))  # yields
        assert kv["pool_tokens"] > 0 and kv["pool_bytes"] > 0
        assert after_burst["arbiter"]["recent_ttft_ms"] is not None  # first tokens fed the window
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=60) as resp:
            fam = {f.name: f.samples for f in text_string_to_metric_families(resp.read().decode())}
        assert fam["alchemist_arbiter_transitions"][0].value >= 2
        assert {s.labels["state"]: s.value for s in fam["alchemist_arbiter_state"]}["TRAINING"] == 1.0
        parts = {s.labels["part"]: s.value for s in fam["alchemist_memory_bytes"]}
        assert parts["weights"] == memory["weights_bytes"] and parts["kv_pool"] == kv["pool_bytes"]
        moved = {s.labels["direction"]: s.value for s in fam["alchemist_memory_moved_bytes"]}
        assert moved["to_host"] >= saved["moved_to_host_bytes"]  # later steps may move more
