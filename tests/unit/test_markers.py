"""The suite's rules (tests/conftest.py): a test marked ``gpu`` is skipped without a CUDA device
and runs with one; unmarked tests are never touched; under ``make test``'s two xdist workers every
integration test is in one work unit (one worker) and each unit test is its own."""

from __future__ import annotations

import pytest
import torch

from tests import conftest


class _Item:
    def __init__(self, *keywords: str) -> None:
        self.keywords = {k: True for k in keywords}
        self.markers: list[pytest.MarkDecorator] = []

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.append(marker)


@pytest.mark.parametrize("has_cuda", [False, True])
def test_gpu_marked_tests_skip_only_without_cuda(monkeypatch, has_cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    gpu, cpu = _Item("gpu", "test_x"), _Item("test_y")
    conftest.pytest_collection_modifyitems(None, [gpu, cpu])  # type: ignore[arg-type]
    assert cpu.markers == []
    if has_cuda:
        assert gpu.markers == []
    else:
        assert [m.name for m in gpu.markers] == ["skip"]
        assert "CUDA" in gpu.markers[0].kwargs["reason"]


def test_integration_tests_are_one_work_unit_and_each_unit_test_its_own() -> None:
    from tests.support.one_worker import SERVERS, scope_of

    assert scope_of("tests/integration/test_serving.py::test_a") == SERVERS
    assert scope_of("tests/integration/test_replay_live.py::test_b[tiny]") == SERVERS
    unit = "tests/unit/test_integration_names.py::test_c"
    assert scope_of(unit) == unit


def test_the_cuda_staging_test_carries_the_gpu_marker() -> None:
    from tests.unit import test_record_gpu_path as mod

    marks = mod.test_cuda_path_pinned_async_copies_see_values_before_in_place_overwrites.pytestmark
    assert [m.name for m in marks] == ["gpu"]
