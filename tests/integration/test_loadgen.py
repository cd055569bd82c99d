"""The eval harness against a real server (tiny model, CPU): load-generator numbers, feedback
accounting, A/B alternation with real radix-cache flushes, the CLI end to end, and servers that
the harness starts itself. Never asserts absolute times."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from eval.cli import write_result
from eval.loadgen.ab import Arm, run_ab
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.feedback import FeedbackPolicy, RewardRule
from eval.loadgen.runner import LoadSpec, run_load, run_load_sync
from eval.loadgen.workloads import Conversation, default_workload, shared_system_prompt

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _ordered(summary: dict, metric: str) -> None:
    p50, p95, p99 = (summary[f"{metric}_p{q}"] for q in (50, 95, 99))
    assert 0 < p50 <= p95 <= p99, (metric, p50, p95, p99)


def test_loadgen_session_writes_sane_numbers(tiny_server, tmp_path: Path) -> None:
    workload = default_workload(min_turns=2)[:3]
    spec = LoadSpec(ArrivalSpec(4.0), max_requests=6, max_turns=2, max_tokens=8, seed=1, max_sessions=2,
                    model=tiny_server.model, label="tiny")
    policy = FeedbackPolicy(probability=1.0, rule=RewardRule("keyword", keyword="the"), kind="rating")
    result = run_load_sync(tiny_server.base_url, workload, spec, feedback=policy, progress=False)
    path = tmp_path / "loadgen.json"
    write_result(path, {"summary": result.summary(), "records": result.records})
    data = json.loads(path.read_text())
    summary, records = data["summary"], data["records"]

    # every planned request is accounted for, none failed
    assert summary["planned_requests"] == 6 == len(records) == summary["requests"]
    assert summary["completed_requests"] == 6 and summary["failed_requests"] == 0
    assert sorted(r["index"] for r in records) == list(range(6))
    for r in records:
        assert r["error"] is None
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert 1 <= r["output_tokens"] <= 8 and r["prompt_tokens"] > 0
        if r["output_tokens"] > 1:
            assert r["tpot_s"] > 0 and all(x >= 0 for x in r["itl_s"])
        assert r["completion_id"]
    assert len({r["completion_id"] for r in records}) == 6
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"):
        _ordered(summary, metric)
    assert summary["ttft_ms_p99"] <= summary["e2e_ms_p99"]
    assert summary["output_tokens_total"] == sum(r["output_tokens"] for r in records)

    # multi-turn: a second turn carries the first turn's history, so its prompt is longer
    by_conv: dict[int, dict[int, dict]] = {}
    for r in records:
        by_conv.setdefault(r["session"], {})[r["turn"]] = r
    assert all(len({r["conv_id"] for r in turns.values()}) == 1 for turns in by_conv.values())
    second_turns = [(t[0], t[1]) for t in by_conv.values() if 1 in t]
    # max_sessions=2: arrivals wait for one of the two users, so at least two conversations go on
    assert len(second_turns) >= 2 and all(0 in turns for turns in by_conv.values())
    assert sum(len(turns) for turns in by_conv.values()) == 6
    assert all(t1["prompt_tokens"] > t0["prompt_tokens"] for t0, t1 in second_turns)
    assert all(t1["start_s"] >= t0["start_s"] + t0["e2e_s"] for t0, t1 in second_turns)

    # feedback: every completed request was rated and every answer is counted exactly once
    fb = summary["feedback"]
    assert fb["attempted"] == 6 and fb["transport_errors"] == 0
    assert sum(fb["by_status"].values()) == 6
    # The server has the feedback route and every completion is logged: all six are accepted.
    assert fb["accepted"] == 6 and fb["route_unavailable"] == 0, fb
    assert all(200 <= int(code) < 300 for code in fb["by_status"]), fb["by_status"]
    assert [r["feedback"] for r in records] == ["accepted"] * 6
    assert all(r["reward"] in (-1.0, 1.0) for r in records)


def _admin(server, path: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{server.base_url}{path}", data=b"{}", method="POST",
                                                  headers={"Content-Type": "application/json"}),
                           timeout=60).read()


def test_flush_cache_really_empties_the_radix_cache(tiny_server) -> None:
    from eval.server import flush_cache

    conv = shared_system_prompt(num_groups=1, prompts_per_group=1, system_prompt_words=120, seed=5)
    spec = LoadSpec(ArrivalSpec(float("inf")), max_requests=1, max_turns=1, max_tokens=2, model=tiny_server.model)
    # A publish between the requests would change the radix namespace: hold training meanwhile.
    _admin(tiny_server, "/alchemist/train/pause")
    try:
        assert flush_cache(tiny_server.base_url) >= 1
        cached = []
        for flush_first in (False, False, True):
            if flush_first:
                flush_cache(tiny_server.base_url)
            (rec,) = run_load_sync(tiny_server.base_url, conv, spec, progress=False).records
            assert rec["error"] is None
            cached.append(rec["cached_tokens"] or 0)
    finally:
        _admin(tiny_server, "/alchemist/train/resume")
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0, cached


def test_ab_alternates_blocks_on_the_same_conversations(tiny_server) -> None:
    calls: list[str] = []
    arms = [Arm("off", tiny_server.base_url, lambda: calls.append("off")),
            Arm("on", tiny_server.base_url, lambda: calls.append("on"))]
    workload = shared_system_prompt(num_groups=2, prompts_per_group=4, system_prompt_words=40, seed=2)
    spec = LoadSpec(ArrivalSpec(8.0), max_requests=2, max_turns=1, max_tokens=4, model=tiny_server.model)
    run_block = lambda url, w, s: run_load_sync(url, w, s, progress=False)  # noqa: E731
    ab = run_ab(arms, workload, spec, blocks=2, run_block=run_block)
    assert ab.order == ["off", "on", "on", "off"] == calls
    assert ab.radix_flushed_between_arms and ab.flush_attempts >= 4
    for arm in ("off", "on"):
        assert ab.summary(arm)["completed_requests"] == 4
        assert [len(b) for b in [ab.block_summaries[arm]]] == [2]
    for block in (0, 1):
        convs = {arm: sorted(r["conv_id"] for r in ab.records[arm] if r["block"] == block) for arm in ("off", "on")}
        assert convs["off"] == convs["on"]
    assert {r["conv_id"] for r in ab.records["on"] if r["block"] == 0}.isdisjoint(
        {r["conv_id"] for r in ab.records["on"] if r["block"] == 1})
    # The ratio is the arms' median TTFTs, recomputed here from the request records.
    p50 = {arm: statistics.median(1000.0 * r["ttft_s"] for r in ab.records[arm]) for arm in ("off", "on")}
    assert all(v > 0 for v in p50.values()), p50
    assert ab.ratio("ttft_ms_p50", "on", "off") == pytest.approx(p50["on"] / p50["off"], rel=1e-6)


def test_failures_are_counted_not_raised(tiny_server) -> None:
    from eval.server import free_port

    too_long = [Conversation("long", ("word " * 6000,))]  # beyond the config's context-length (4096)
    spec = LoadSpec(ArrivalSpec(float("inf")), max_requests=2, max_turns=1, max_tokens=2, model=tiny_server.model)
    s = asyncio.run(run_load(tiny_server.base_url, too_long, spec, progress=False)).summary()
    assert (s["requests"], s["failed_requests"], s["completed_requests"]) == (2, 2, 0)
    dead = run_load_sync(f"http://127.0.0.1:{free_port()}", [Conversation("c", ("hi",))], spec, progress=False)
    assert [r["error"] is not None for r in dead.records] == [True, True]
    assert all("Connection" in r["error"] for r in dead.records)


@pytest.mark.slow
def test_cli_serving_smoke_and_report(tiny_server, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    run = subprocess.run([sys.executable, "-m", "eval", "run", "serving", "--smoke", "--url", tiny_server.base_url,
                          "--out", str(tmp_path), "--no-progress"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "per_rate" in run.stdout and "ttft_ms_p99" in run.stdout
    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["failed_requests"] == 0 and data["model"] == tiny_server.model
    for label, s in data["per_rate"].items():
        assert s["completed_requests"] == s["requests"] == data["requests_per_rate"], label
        _ordered(s, "ttft_ms")
        _ordered(s, "e2e_ms")
    meta = data["meta"]
    assert meta["environment"]["packages"]["sglang"] == "0.5.23"
    assert len(meta["load_end"]["loadavg"]) == 3 and meta["wall_s"] > 0
    rep = subprocess.run([sys.executable, "-m", "eval", "report", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    for name in ("serving-latency-cdf.png", "serving-timeline.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
