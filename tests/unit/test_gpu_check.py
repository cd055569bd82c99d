"""eval/gpu_check.py on CPU (``--cpu-smoke``): it runs to completion, reports the replay ratio
against the ideal and the ceiling and the offload section's peaks (logical on CPU), and says
loudly that CPU numbers are not GPU numbers."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke():
    import torch

    sys.path.insert(0, str(ROOT))
    from eval import gpu_check

    threads = torch.get_num_threads()
    try:
        return gpu_check, gpu_check.main(["--cpu-smoke"])
    finally:
        torch.set_num_threads(threads)


def test_cpu_smoke_reports_ratio_ideal_and_ceiling(smoke) -> None:
    _, result = smoke
    assert result["is_gpu_number"] is False and result["device"] == "cpu"
    assert result["shape"] == "small" and result["repetitions"] == 5
    assert 0 < result["forward_share"] < 1
    assert result["prompt_fraction"] == pytest.approx(96 / 120)  # --cpu-smoke: 96 + 24 tokens
    assert result["ideal_ratio"] > 1 and math.isfinite(result["ceiling_ratio"])
    assert result["ceiling_ratio"] > 0 and result["ratio"] > 0
    assert math.isfinite(result["ratio_vs_ideal"]) and math.isfinite(result["ratio_vs_ceiling"])
    assert result["step_s_ceiling"] > 0
    # The derived numbers (ratio, ideal, ceiling) are checked against hand-computed values from
    # known step times in test_derived_numbers_from_known_step_times.


def test_derived_numbers_from_known_step_times(monkeypatch) -> None:
    """The ratios from step times the test chooses, against numbers worked out by hand.

    Every replay step takes 1.0 s except one outlier of 10 s, every recompute step 2.0 s of which
    the forward is 1.0 s, every ceiling step 1.2 s; prompts are 96 of 120 tokens (f = 0.8):
      ratio   = median of 2.0 / replay = 2.0, spread 2.0 - 0.2 = 1.8
      ideal   = 1 / (1 - 0.5 * 0.8) = 5 / 3
      ceiling = 2.0 / (2.0 - (2.0 - 1.2) * 0.8) = 2.0 / 1.36 = 1.470588...
      ratio / ideal = 1.2, ratio / ceiling = 1.36; tokens per step 2 * 120 = 240
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from eval import gpu_check

    ceiling_plans: set[int] = set()
    real_ceiling_plan = gpu_check.ceiling_plan

    def tagged_ceiling_plan(planned, every_row):
        out = real_ceiling_plan(planned, every_row)
        ceiling_plans.add(id(out))
        return out

    replay_calls = [0]

    def known_step(trainer, plans, device):
        if id(plans[0]) in ceiling_plans:
            return 1.2, 0.6
        if trainer.config.replay:
            replay_calls[0] += 1
            return (10.0 if replay_calls[0] == 3 else 1.0), 0.5
        return 2.0, 1.0

    monkeypatch.setattr(gpu_check, "ceiling_plan", tagged_ceiling_plan)
    monkeypatch.setattr(gpu_check, "timed_step", known_step)
    threads = torch.get_num_threads()
    try:
        result = gpu_check.main(["--cpu-smoke", "--section", "replay"])
    finally:
        torch.set_num_threads(threads)
    assert replay_calls[0] == 1 + 5  # the warm-up and --cpu-smoke's five repetitions
    assert result["ratio"] == pytest.approx(2.0) and result["ratio_spread"] == pytest.approx(1.8)
    assert result["forward_share"] == pytest.approx(0.5)
    assert result["ideal_ratio"] == pytest.approx(5 / 3)
    assert result["ceiling_ratio"] == pytest.approx(1.4705882, rel=1e-6)
    assert result["ratio_vs_ideal"] == pytest.approx(1.2)
    assert result["ratio_vs_ceiling"] == pytest.approx(1.36)
    assert result["tokens_per_step"] == 240
    assert result["tokens_per_s_replay"] == pytest.approx(240.0)
    assert result["tokens_per_s_recompute"] == pytest.approx(120.0)


def test_cpu_smoke_prints_that_cpu_numbers_are_not_gpu_numbers(smoke, capsys) -> None:
    gpu_check, _ = smoke
    gpu_check.main(["--device", "cpu", "--small"])  # the older spelling of --cpu-smoke
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["max_grad_rel_err_replay_vs_recompute"] <= 1e-4
    assert lines[1] == gpu_check.CPU_WARNING and "NOT GPU numbers" in lines[1]
    assert json.loads(lines[2])["is_gpu_number"] is False
    assert lines[-1].startswith("ratio ") and "ideal" in lines[-1] and "ceiling" in lines[-1]
    assert gpu_check.CPU_WARNING in lines[-1]



def test_cpu_smoke_offload_section_moves_the_stack_and_keeps_two_layers_resident(smoke) -> None:
    gpu_check, result = smoke
    off = result["offload"]  # the default --section all runs it after the replay arms
    assert off["measurement"] == "logical-cpu" and off["is_gpu_number"] is False
    assert off["layers"] == 4 and off["tokens"] == 120
    # bf16 stand-ins of one layer's saved tensors, by hand: 120 tokens x (6 x 64 + 3 x 192)
    # elements x 2 bytes = 230,400 bytes
    assert off["layer_bytes"] == 230_400
    assert off["peak_bytes_no_offload"] == 921_600  # all 4 layers resident
    # offloaded: the layer being read plus the one prefetched, never more: 2 x 230,400
    assert off["peak_bytes_offload"] == 460_800
    assert off["reduction"] == pytest.approx(0.5)
    assert off["checksums_equal"] is True  # the data came back intact from the host pool
    assert off["d2h_gb_s"] > 0 and off["h2d_gb_s"] > 0 and off["time_ratio"] > 0


def test_cpu_smoke_offload_alone_says_its_numbers_are_not_gpu_numbers(smoke, capsys) -> None:
    gpu_check, _ = smoke
    gpu_check.main(["--cpu-smoke", "--section", "offload"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["section"] == "offload"
    assert lines[1].startswith("offload: peak ") and gpu_check.CPU_WARNING in lines[1]
