"""``python -m eval run dedup --smoke`` end to end: two tiny servers (configs/cpu-tiny.yaml), one
with the radix cache and ``store.dedup`` on, one with both off, the same short streams through
each. The numbers of a smoke run mean little; what is checked is what must hold whatever the
model says: without dedup the store holds every prompt token sent, once per request, all of it
readable; with dedup it holds less, and the shared system prompt is served from the radix cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_dedup_smoke_run_measures_both_arms(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    run = subprocess.run([sys.executable, "-m", "eval", "run", "dedup", "--smoke", "--config",
                          "configs/cpu-tiny.yaml", "--out", str(tmp_path), "--no-progress"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads((tmp_path / "dedup.json").read_text())
    assert "error" not in data
    servers = data["meta"]["servers"]
    assert [s["resolved_config"]["store"]["dedup"] for s in servers] == [True, False]
    assert servers[1]["resolved_config"]["sglang"]["disable-radix-cache"] is True
    assert data["store_clean"], data["problems"]
    bpt = data["bytes_per_token"]
    for name in ("multi_turn", "shared_system_prompt"):
        w = data[name]
        assert w["bytes_without_dedup"] == w["prompt_tokens"] * bpt, w
        assert w["coverage_without_dedup"] == 1.0 and w["cached_tokens_without_dedup"] == 0, w
        assert 0 < w["bytes_with_dedup"] < w["bytes_without_dedup"], w
        assert w["ratio"] > 1 and w["ideal_ratio"] > 1, w
    shared = data["shared_system_prompt"]
    assert shared["coverage_with_dedup"] == 1.0 and shared["cached_tokens_with_dedup"] > 0, shared
    assert data["store"]["without"]["bytes_deduplicated"] == 0
