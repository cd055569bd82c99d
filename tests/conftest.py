"""Suite-wide settings: two cores, passive OpenMP threads, GPU tests skipped without a GPU, and
the schedule of `make test`'s two xdist workers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: called only when xdist runs
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Every integration test on one worker, the unit tests beside them (tests/support/one_worker.py)."""
    from tests.support.one_worker import ServersOnOneWorker  # noqa: PLC0415

    return ServersOnOneWorker(config, log)  # type: ignore[arg-type]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
