"""The hook-point manifest resolves against the installed sglang, and a missing name is named."""

from __future__ import annotations

import os

import pytest

from alchemist_sgl.errors import ManifestError
from alchemist_sgl.integration.environment import activate_cpu_stand_ins

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
activate_cpu_stand_ins()

from alchemist_sgl.integration.manifest import MANIFEST, PINNED_SGLANG_VERSION, HookPoint, check_manifest  # noqa: E402


def test_every_manifest_entry_resolves_in_installed_sglang() -> None:
    checked = check_manifest(is_cpu=True)
    assert set(checked) == {p.name for p in MANIFEST}


def test_missing_name_stops_startup_naming_it_and_the_pinned_version() -> None:
    ghost = HookPoint("sglang.srt.managers.scheduler.Scheduler.no_such_method", "test")
    with pytest.raises(ManifestError) as err:
        check_manifest(is_cpu=True, extra=(ghost,))
    assert "Scheduler.no_such_method" in str(err.value)
    assert PINNED_SGLANG_VERSION in str(err.value)


def test_inference_mode_switch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from alchemist_sgl.config import load_config
    from alchemist_sgl.integration.environment import check_environment_switches

    monkeypatch.setenv("SGLANG_ENABLE_TORCH_INFERENCE_MODE", "1")
    with pytest.raises(ManifestError, match="INFERENCE_MODE"):
        check_environment_switches(load_config(None))
