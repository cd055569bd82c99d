"""Import boundaries of ``alchemist_sgl.train`` and the CPU smoke run of ``eval/gpu_check.py``.

The GPU machine has torch but no sglang (and the train package must never need more than torch),
so importing the package must pull in neither sglang, transformers, peft, safetensors nor pyyaml.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_train_package_imports_only_torch():
    code = ("import sys, alchemist_sgl.train, alchemist_sgl.train.trainer; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"})
    loaded = set(json.loads(out.stdout.strip().replace("'", '"')))
    assert "torch" in loaded
    assert not loaded & {"sglang", "transformers", "peft", "safetensors", "yaml"}, loaded
    pkg_modules = {m for m in loaded if m.startswith("alchemist")}
    assert pkg_modules == {"alchemist_sgl"}


def test_gpu_check_smoke_on_cpu(capsys):
    sys.path.insert(0, str(ROOT))
    from eval import gpu_check

    result = gpu_check.main(["--device", "cpu", "--small"])
    printed = capsys.readouterr().out
    check = json.loads(printed.splitlines()[0])
    assert check["max_grad_rel_err_replay_vs_recompute"] <= 1e-4
    assert result["ratio"] > 0 and result["repetitions"] == 5
    assert result["tokens_per_s_replay"] > 0 and result["tokens_per_s_recompute"] > 0
    assert "ratio" in printed.splitlines()[-1]


@pytest.mark.parametrize("module", ["forward", "joint", "lora", "objectives", "ops", "samples", "spec", "units", "rounds", "optimizer_unit", "stats",
                                    "trainer", "weights", "layer", "warmup", "context",
                                    "replay_rows", "graph_backward", "graph_layer"])
def test_train_modules_state_their_contract(module):
    import importlib
    mod = importlib.import_module(f"alchemist_sgl.train.{module}")
    assert mod.__doc__ and len(mod.__doc__.strip().splitlines()) >= 2
    lines = Path(mod.__file__).read_text().count("\n")
    assert lines <= 300, f"{module}.py has {lines} lines"
