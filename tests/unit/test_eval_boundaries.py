"""The harness talks HTTP only: its modules never import sglang nor the alchemist_sgl runtime
(docs/development.md). Scope: the harness itself (CLI, context, server, monitor, report, table, loadgen, the
registry and the ``serving`` experiment); other experiments declare their own needs (``replay``
trains in-process and imports the trainer by design)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "eval"
ALLOWED_ALCHEMIST = {"alchemist_sgl.config"}
HARNESS = sorted([p for p in EVAL.glob("*.py") if p.name not in ("gpu_check.py", "gpu_offload.py")] + list((EVAL / "loadgen").glob("*.py"))
                 + [EVAL / "experiments" / "__init__.py", EVAL / "experiments" / "serving.py"])


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_sglang_or_runtime_imports_in_eval() -> None:
    files = HARNESS
    assert len(files) > 10
    bad = {
        f"{p.relative_to(EVAL)}: {name}"
        for p in files
        for name in _imports(p)
        if name.split(".")[0] == "sglang" or (name.split(".")[0] == "alchemist_sgl" and name not in ALLOWED_ALCHEMIST)
    }
    assert not bad


def test_importing_every_eval_module_loads_neither_sglang_nor_torch() -> None:
    modules = [".".join(p.relative_to(EVAL.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in HARNESS if p.name != "__main__.py"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('sglang', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=EVAL.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
