"""Suite-wide settings: two cores, passive OpenMP threads, and GPU tests skipped without a GPU."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _one_worker_for_the_servers(items)
    try:
        import torch  # noqa: PLC0415

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _one_worker_for_the_servers(items: list[pytest.Item]) -> None:
    """Under ``make test`` (pytest-xdist, ``--dist loadgroup``) every integration test runs on one
    worker, in collection order, so the session's servers are started once and the tests that
    restart or break a server never overlap another server test; the unit tests run on the other
    worker beside them. Without xdist the marker does nothing."""
    group = pytest.mark.xdist_group("servers")
    for item in items:
        if "tests/integration/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(group)
