"""The ``online``, ``spike`` and ``demo`` experiments end to end against a real server: ``python -m eval run
NAME --smoke`` starts its own tiny server (configs/cpu-tiny.yaml, with the experiment's own
overrides and state folders under the output folder), runs one round of short blocks and writes
its result file. The numbers of a smoke run mean nothing; what is checked is that the code behind
the headline numbers ran against a live server and measured every arm: samples trained, ratios
present and finite, nothing trained while serving only, no request failed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


# The tiny test config closes a round at its first sample (train.round_max_samples: 1), faster
# than /alchemist/status is polled; the experiments count whole rounds, so here a round holds
# until train.round_s: 3 s (``online`` sets its own with --set) instead of cpu-base's 60 s, which
# would close no round inside a smoke block. The gate's held-out scoring is skipped.
SMOKE_CONFIG = """base: {repo}/configs/cpu-tiny.yaml
train:
  round_max_samples: 64
  round_s: 3
publish:
  gate:
    enabled: false
"""


def _run_experiment(name: str, out: Path) -> dict:
    config = out / "smoke-tiny.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(SMOKE_CONFIG.format(repo=REPO))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    run = subprocess.run([sys.executable, "-m", "eval", "run", name, "--smoke", "--config", str(config),
                          "--out", str(out), "--no-progress"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads((out / f"{name}.json").read_text())
    assert "error" not in data
    print(json.dumps({k: data.get(k) for k in ("notes", "per_block", "arms")}, default=str)[:6000])
    assert data["meta"]["smoke"] is True and data["meta"]["experiment"] == name
    (server,) = data["meta"]["servers"]
    assert server["resolved_config"]["server"]["model"] == "tiny"
    return data


def _state_under_out(out: Path) -> None:
    """The experiment's one server kept its state in its own folder under the output folder."""
    state = out / "state" / "server-0"
    assert (state / "checkpoints" / "versions.json").is_file(), sorted(p.name for p in out.rglob("*"))
    assert (state / "feedback.sqlite").is_file()


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_online_smoke_run_trains_in_both_training_arms(tmp_path: Path) -> None:
    data = _run_experiment("online", tmp_path)
    assert data["block_order"] == ["serving_only", "replay", "recompute"]
    assert data["radix_flushed_between_arms"] is True
    assert data["failed_requests"] == 0 and data["requests_per_arm"] > 0
    assert data["samples"] > 0, "the feeder got no feedback accepted"
    assert data["publishes"] > 0 and data["weight_version_end"] != data["weight_version_start"]
    assert data["samples_trained_while_serving_only"] == 0
    for arm in ("replay", "recompute"):
        numbers = data["arms"][arm]
        assert _positive(numbers["samples_trained_per_s"]), (arm, numbers)
        assert _positive(numbers["trained_tokens_per_s"]), (arm, numbers)
        assert numbers["rounds"] >= 1, (arm, numbers)
    assert data["arms"]["serving_only"]["requests"] > 0
    assert _positive(data["live_ratio"]) and data["live_ratios"]
    assert all(_positive(r) for r in data["live_ratios"])
    assert 0.0 <= data["lag0_share_samples"] <= 1.0
    _state_under_out(tmp_path)


def test_spike_smoke_run_measures_both_arms(tmp_path: Path) -> None:
    data = _run_experiment("spike", tmp_path)
    assert data["arbiter_enabled"] is True  # the experiment's memory.enabled=true reached the server
    assert data["failed_requests"] == 0 and data["requests_per_arm"] > 0
    assert _positive(data["ttft_p95_serving_only"]) and _positive(data["ttft_p95_with_training"])
    assert _positive(data["ratio"])
    assert data["train_steps_during_run"] > 0, "nothing trained in the with-training block"
    assert data["train_steps_while_serving_only"] == 0
    assert sorted(row["arm"] for row in data["per_block"].values()) == ["serving_only", "with_training"]
    _state_under_out(tmp_path)


def test_demo_smoke_run_publishes_and_measures_every_round(tmp_path: Path) -> None:
    data = _run_experiment("demo", tmp_path)
    rounds = data["settings"]["rounds"]
    assert data["versions_published"] == rounds and data["weight_version_after"] != data["weight_version_before"]
    assert [x for x, _ in data["series"]] == [k * data["settings"]["per_round"] for k in range(rounds + 1)]
    assert all(math.isfinite(y) and y <= 0.0 for _, y in data["series"])  # mean log-probs
    assert all(r["ups"] + r["corrections"] <= r["samples"] for r in data["rounds"])
    assert len(data["answers_before"]) == len(data["answers_after"]) == data["settings"]["heldout"]
    assert 0.0 <= data["generation_rate_before"] <= 1.0 and 0.0 <= data["generation_rate_after"] <= 1.0
    assert isinstance(data["moved_in_rewarded_direction"], bool)
    _state_under_out(tmp_path)
