"""The gate as work units: score the held-out pairs, then decide (online/gate.py's ``decide``).

Owns ``gate_units``, a generator the loop's publish runs (loop.py, Note [Work as a generator]):
it yields ``"gate"`` once per scoring unit and returns the ``GateDecision``. It scores v0 and the
last accepted version once (their metrics are kept in the version registry) and the candidate
every time. Imports package modules only; never sglang.
"""

from __future__ import annotations

from typing import Generator, Literal

from alchemist_sgl.config import GateConfig
from alchemist_sgl.log import get_logger
from alchemist_sgl.online.gate import GateDecision, decide
from alchemist_sgl.online.versions import VersionRegistry
from alchemist_sgl.train.samples import Sample
from alchemist_sgl.train.trainer import ReplayTrainer

logger = get_logger(__name__)


def gate_units(trainer: ReplayTrainer, registry: VersionRegistry, pairs: list[Sample],
               gc: GateConfig) -> Generator[str, None, GateDecision]:
    """``gc``: ``publish.gate`` (max_regression, max_regression_total)."""
    if registry.v0_metric() is None and registry.serving.name == "v0":
        v0 = yield from _score(trainer, pairs, "published")
        registry.set_metric("v0", v0)
    last = registry.last_accepted_metric()
    if last is None:
        last = yield from _score(trainer, pairs, "published")
        registry.set_metric(registry.serving.name, last)
    candidate = yield from _score(trainer, pairs, "trained")
    v0_metric = registry.v0_metric()
    decision = decide(candidate, last, v0_metric if v0_metric is not None else last,
                      gc.max_regression, gc.max_regression_total)
    logger.info("gate: candidate NLL %.4f, last accepted %.4f, v0 %s: %s", candidate, last,
                "%.4f" % v0_metric if v0_metric is not None else "n/a", decision.reason)
    return decision


def _score(trainer: ReplayTrainer, pairs: list[Sample],
           which: Literal["trained", "published"]) -> Generator[str, None, float]:
    run = trainer.begin_scoring(pairs, which)
    while not run.is_done:
        run.run_unit()
        yield "gate"
    return run.result()
