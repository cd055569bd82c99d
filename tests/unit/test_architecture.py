"""Dependency rules of docs/development.md, checked mechanically with import-linter (.importlinter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--config", str(REPO / ".importlinter")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _lint_copy(tmp_path: Path, edits: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """lint-imports with the repository's ``layers`` and ``acyclic-siblings`` contracts over a copy
    of the package in which each file of ``edits`` gets that line appended."""
    import configparser
    import shutil

    shutil.copytree(REPO / "alchemist_sgl", tmp_path / "alchemist_sgl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel, line in edits.items():
        path = tmp_path / rel
        path.write_text(path.read_text() + "\n" + line + "\n")
    real = configparser.ConfigParser()
    real.read(REPO / ".importlinter")
    config = configparser.ConfigParser()
    config["importlinter"] = {"root_package": "alchemist_sgl"}
    for name in ("layers", "acyclic-siblings"):
        config[f"importlinter:contract:{name}"] = dict(real[f"importlinter:contract:{name}"])
    with open(tmp_path / "contracts.ini", "w") as f:
        config.write(f)
    lint = Path(sys.executable).parent / "lint-imports"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    return subprocess.run([str(lint), "--no-cache", "contracts.ini"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_copy_of_the_package_keeps_the_contracts(tmp_path: Path) -> None:
    """The control for the two tests below: the unedited copy passes."""
    proc = _lint_copy(tmp_path, {})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    """store/ importing record/ again (the circle the record plan's move to core/ broke)."""
    proc = _lint_copy(tmp_path, {"alchemist_sgl/store/pool.py": "import alchemist_sgl.record.capture"})
    assert proc.returncode != 0
    assert "downward only" in proc.stdout and "BROKEN" in proc.stdout
    assert "alchemist_sgl.store.pool -> alchemist_sgl.record.capture" in proc.stdout


def test_a_circle_inside_train_breaks_the_acyclic_contract(tmp_path: Path) -> None:
    """layer.py naming the trainer again (layer -> trainer -> joint -> layer), even under
    TYPE_CHECKING, is the circle the LayerContext removed."""
    line = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from alchemist_sgl.train.trainer import ReplayTrainer")
    proc = _lint_copy(tmp_path, {"alchemist_sgl/train/layer.py": line})
    assert proc.returncode != 0
    assert "No cycles are allowed in alchemist_sgl.train" in proc.stdout
    assert "1 kept, 1 broken" in proc.stdout
