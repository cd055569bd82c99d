"""Real SGLang servers on CPU for integration tests: one per configuration per test session.

Fixtures:
  server_pool   session-wide ``ServerPool``; ``server_pool.get(config, overrides)`` starts or reuses.
  tiny_server   ``configs/cpu-tiny.yaml`` (random-init tiny Llama, fp32); ``.base_url``, ``.model``.
  smollm2_server ``configs/cpu-smollm2.yaml`` (SmolLM2-135M-Instruct, bf16).
Tests that restart or break a server use ``tests.support.servers.dedicated_server`` instead.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.servers import RunningServer, ServerPool

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def server_pool() -> Iterator[ServerPool]:
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def tiny_server(server_pool: ServerPool) -> RunningServer:
    return server_pool.get("configs/cpu-tiny.yaml")


@pytest.fixture(scope="session")
def smollm2_server(server_pool: ServerPool) -> RunningServer:
    return server_pool.get("configs/cpu-smollm2.yaml")
