"""The type checker passes over the package (mypy.ini): strict on the data-path packages, and the
package's own imports always resolve (only third-party packages without types are ignored)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_passes_over_the_package() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Success" in proc.stdout


def test_the_strict_packages_are_strict() -> None:
    """A strict section must cover each data-path package, so dropping one fails here."""
    text = (ROOT / "mypy.ini").read_text()
    strict = [block for block in text.split("\n[") if "disallow_untyped_defs = True" in block
              and "disallow_any_generics = True" in block and "disallow_untyped_calls = True" in block]
    assert len(strict) == 1, "one strict section"
    header = strict[0].splitlines()[0]
    for pkg in ("online", "train", "store", "feedback", "record"):
        assert f"alchemist_sgl.{pkg}.*" in header, pkg
