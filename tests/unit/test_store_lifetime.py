"""Note [Store outlives the radix cache]: a store smaller than SGLang's KV pool is reported."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from alchemist_sgl.integration.capture_hooks import _check_lifetime_against_radix
from tests.support.store_rig import make_store


@pytest.mark.parametrize("slots, kv_tokens, warns", [(10, 1000, True), (1000, 1000, False), (10, 0, False)])
def test_store_smaller_than_kv_pool_warns(caplog: pytest.LogCaptureFixture, slots: int, kv_tokens: int,
                                          warns: bool) -> None:
    store = make_store(slots=slots)
    logger = logging.getLogger("alchemist_sgl")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="alchemist_sgl"):
            _check_lifetime_against_radix(SimpleNamespace(max_total_num_tokens=kv_tokens), store, store.plan)
    finally:
        logger.removeHandler(caplog.handler)
    assert any("fewer than SGLang's KV pool" in r.getMessage() for r in caplog.records) == warns
