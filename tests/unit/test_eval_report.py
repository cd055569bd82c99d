"""Tables, the experiment registry, result writing and the report's PNG plots (no server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from eval.cli import write_result
from eval.experiments import discover
from eval.report import find_series, write_report
from eval.table import render_markdown, render_text, tables


def _result() -> dict:
    return {
        "model": "m",
        "failed_requests": 0,
        "ratio": float("nan"),
        "per_rate": {"rate=1": {"ttft_ms_p50": 10.0, "ttft_ms_p99": 30.0, "requests": 3},
                     "rate=2": {"ttft_ms_p50": 20.0, "ttft_ms_p99": 50.0, "requests": 3}},
        "latency_samples": {"rate=1": {"ttft_s": [0.01, 0.02, 0.03], "e2e_s": [0.1, 0.2, 0.3], "itl_s": [0.01] * 5},
                            "rate=2": {"ttft_s": [0.02, 0.05], "e2e_s": [0.2, 0.5]}},
        "timeline": {"rate=1": [{"t_s": 0.0, "load1": 0.5, "rss_bytes": 2.0e8},
                                {"t_s": 1.0, "request_rps": 2.0, "output_tps": 30.0},
                                {"t_s": 1.5, "load1": 0.7, "rss_bytes": 2.1e8}]},
        "learning": {"metric": "reward", "replay_exact": {"series": [[0, -1.0], [10, 0.0], [20, 0.5]], "final": 0.5},
                     "recompute": {"series": [[0, -1.0], [10, -0.5]], "final": -0.5}},
    }


def test_tables_skip_plot_data_and_show_matrices() -> None:
    tabs = {title: (headers, rows) for title, headers, rows in tables(_result())}
    fields = [r[0] for r in tabs["results"][1]]
    assert "model" in fields and "learning.replay_exact.final" in fields
    assert not any("latency_samples" in f or "timeline" in f or "series" in f for f in fields)
    headers, rows = tabs["per_rate"]  # more metrics than labels: one row per metric
    assert headers == ["metric", "rate=1", "rate=2"]
    assert rows == [["ttft_ms_p50", "10", "20"], ["ttft_ms_p99", "30", "50"], ["requests", "3", "3"]]
    text = render_text(_result())
    assert "rate=2" in text and "nan" in text
    assert "| ttft_ms_p99 | 30 | 50 |" in render_markdown(_result())
    wide = {"arms": {f"arm{i}": {"p50": i, "p99": 2 * i} for i in range(3)}}
    (_, headers, rows), = tables(wide)
    assert headers == ["arms", "p50", "p99"] and rows[2] == ["arm2", "2", "4"]


def test_registry_finds_the_serving_experiment() -> None:
    found = discover()
    assert "serving" in found
    assert all(callable(m.run) and m.NAME == name for name, m in found.items())


def test_write_result_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_result(path, {"a": math.nan, "b": [math.inf, 1.0], "c": {"d": (1, 2)}})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0], "c": {"d": [1, 2]}}


def test_report_renders_pngs_and_markdown(tmp_path: Path) -> None:
    (tmp_path / "serving.json").write_text(json.dumps(_result()))
    (tmp_path / "broken.json").write_text(json.dumps({"error": "Traceback: boom", "meta": {"wall_s": 1.0}}))
    md = write_report(tmp_path).read_text()
    assert "## serving" in md and "## broken" in md and "FAILED" in md
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["serving-latency-cdf.png", "serving-learning.png", "serving-timeline.png"]
    for name in pngs:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"(plots/{name})" in md


def test_find_series_names_each_curve() -> None:
    assert [p for p, _ in find_series(_result())] == ["learning.replay_exact", "learning.recompute"]


def test_headlines_sit_beside_target_ideal_and_anchor(tmp_path: Path) -> None:
    replay = {"tokens_per_s_replay": 150.0, "tokens_per_s_hf_reference": 100.0, "ratio": 1.2,
              "ideal_ratio": 1.5, "per_plan": {"graph": {"ratio": 1.3, "ideal_ratio": 1.6}},
              "meta": {"environment": {"cpu_model": "Test CPU", "cpu_count": 2, "platform": "Linux-x",
                                       "gpu": None}}}
    memory = {"reduction": 0.8, "tokens_ratio": None}  # a missing number leaves its row out
    (tmp_path / "replay.json").write_text(json.dumps(replay))
    (tmp_path / "memory.json").write_text(json.dumps(memory))
    md = write_report(tmp_path).read_text()
    assert "| `replay` | replay training tokens/s / HF + PEFT eager | 1.5 | >= 1.72 |  | 1.72x training throughput |" in md
    assert "| `replay` | recompute / graph replay step | 1.3 | >= 1.35 fp32 | 1.6 |  |" in md
    assert "| `memory` | training's peak saved bytes, reduction with offload | 0.8 | >= 0.47 |  | -47% training memory |" in md
    assert "2x training tokens" not in md
    assert "- Test CPU, 2 CPUs, no GPU; Linux-x" in md
    assert md.index("## Headlines") < md.index("## Machine") < md.index("## memory")
