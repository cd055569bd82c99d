"""online/ stays pure: allowed imports only, a docstring per module, small files, data shipped."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ONLINE = Path(__file__).resolve().parents[2] / "alchemist_sgl" / "online"
# The pure modules of the loop (other modules of online/ compose the trainer and may import train).
PURE = ("atomic", "versions", "intake", "completions", "checkpoint", "adapters", "gate", "cadence",
        "guard")
ALLOWED_PACKAGE = ("alchemist_sgl.config", "alchemist_sgl.errors", "alchemist_sgl.log",
                   "alchemist_sgl.feedback.completion_entry",  # a stdlib-only value type
                   *(f"alchemist_sgl.online.{m}" for m in PURE))
ALLOWED_THIRD_PARTY = ("torch", "safetensors")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_pure_modules_import_only_stdlib_torch_safetensors_and_foundations():
    """Transitively pure: a pure module imports other package code only from PURE modules."""
    for mod in PURE:
        path = ONLINE / f"{mod}.py"
        for name in imported(path):
            top = name.split(".")[0]
            ok = (top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY
                  or any(name == p or name.startswith(p + ".") for p in ALLOWED_PACKAGE))
            assert ok, f"{path.name} imports {name}"


def test_each_pure_module_has_a_docstring_and_stays_small():
    for mod in PURE:
        text = (ONLINE / f"{mod}.py").read_text()
        assert ast.get_docstring(ast.parse(text)), mod
        assert len(text.splitlines()) < 300, mod


def test_packaged_heldout_file_is_next_to_the_code():
    assert (ONLINE / "heldout.jsonl").is_file()
