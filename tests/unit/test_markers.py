"""The suite's ``gpu`` marker rule (tests/conftest.py): a test marked ``gpu`` is skipped without a
CUDA device and runs with one; unmarked tests are never touched."""

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


def test_the_cuda_staging_test_carries_the_gpu_marker() -> None:
    from tests.unit import test_record_gpu_path as mod

    marks = mod.test_cuda_path_pinned_async_copies_see_values_before_in_place_overwrites.pytestmark
    assert [m.name for m in marks] == ["gpu"]
