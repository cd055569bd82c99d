"""A bad config stops `alchemist-sgl serve` before anything starts, naming the dotted key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.servers import REPO, SERVE


def _serve(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    return subprocess.run([*SERVE, "--config", str(config), "--port", "1", *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("text, key", [
    ("base: %s\nrecord:\n  enabled: maybe\n" % (REPO / "configs/cpu-tiny.yaml"), "record.enabled"),
    ("base: %s\ntrain:\n  lora:\n    rnk: 4\n" % (REPO / "configs/cpu-tiny.yaml"), "train.lora.rnk"),
    ("base: %s\nsglang:\n  no-such-flag: 3\n" % (REPO / "configs/cpu-tiny.yaml"), "sglang.no-such-flag"),
    ("base: %s\npublish:\n  mode: sometimes\n" % (REPO / "configs/cpu-tiny.yaml"), "publish.mode"),
    ("base: %s\npublish:\n  mode: adapter\n" % (REPO / "configs/cpu-tiny.yaml"), "publish.mode"),
    ("base: %s\ntrain:\n  gradient_mode: response_only\n" % (REPO / "configs/cpu-tiny.yaml"),
     "train.gradient_mode"),
    ("base: %s\ntrain:\n  lora:\n    dropout: 0.1\n" % (REPO / "configs/cpu-tiny.yaml"), "train.lora.dropout"),
    ("base: %s\nsglang:\n  disable-overlap-schedule: false\n" % (REPO / "configs/cpu-tiny.yaml"),
     "sglang.disable-overlap-schedule"),
])
def test_bad_config_fails_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    proc = _serve(tmp_path, text)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"config key '{key}'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_override_fails_naming_the_key(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "base: %s\n" % (REPO / "configs/cpu-tiny.yaml"), "--set", "store.page_tokens=64")
    assert proc.returncode == 2
    assert "config key 'store.page_tokens'" in proc.stderr
    assert "between 1 and 16" in proc.stderr
