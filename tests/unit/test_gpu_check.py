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
    f = result["prompt_fraction"]
    assert f == pytest.approx(96 / 120)
    # The ideal follows from the measured forward share (the definition in eval/gpu_check.py).
    assert result["ideal_ratio"] == pytest.approx(1 / (1 - result["forward_share"] * f))
    assert result["ideal_ratio"] > 1 and math.isfinite(result["ceiling_ratio"])
    assert result["ceiling_ratio"] > 0 and result["ratio"] > 0
    assert result["ratio_vs_ideal"] == pytest.approx(result["ratio"] / result["ideal_ratio"])
    assert result["ratio_vs_ceiling"] == pytest.approx(result["ratio"] / result["ceiling_ratio"])
    assert result["step_s_ceiling"] > 0


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
    assert off["layer_bytes"] == 120 * (6 * 64 + 3 * 192) * 2  # bf16 stand-ins of one layer's saved tensors
    assert off["peak_bytes_no_offload"] == off["layers"] * off["layer_bytes"]  # the whole stack resident
    # offloaded: the layer being read plus the one prefetched, never more
    assert off["peak_bytes_offload"] == 2 * off["layer_bytes"]
    assert off["reduction"] == pytest.approx(1 - 2 / off["layers"])
    assert off["checksums_equal"] is True  # the data came back intact from the host pool
    assert off["d2h_gb_s"] > 0 and off["h2d_gb_s"] > 0 and off["time_ratio"] > 0


def test_cpu_smoke_offload_alone_says_its_numbers_are_not_gpu_numbers(smoke, capsys) -> None:
    gpu_check, _ = smoke
    gpu_check.main(["--cpu-smoke", "--section", "offload"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["section"] == "offload"
    assert lines[1].startswith("offload: peak ") and gpu_check.CPU_WARNING in lines[1]
