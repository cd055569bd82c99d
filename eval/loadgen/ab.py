"""A/B latency comparisons: arms alternated in blocks, radix cache flushed between arms.

Owns ``Arm``, ``run_ab`` and ``rotation_orders``. Round r runs one block per arm, in ABAB... order
on even rounds and reversed (BA...) on odd rounds, so a slow drift of the machine weighs on both
arms alike, or in the orders given (``rotation_orders``: cyclic rotations of the arms, each
followed by its mirror, so with three or more arms each one takes early and late places); both
arms of a round replay the same conversations with the same arrival seed. Before every block the
arm's radix cache is flushed (``POST /flush_cache``, retried until 200) so no arm inherits the
other's cached prefixes; ``radix_flushed_between_arms`` says whether every flush succeeded.
Reusable by any experiment (record-overhead, spike, ...). Must not import the runtime or sglang.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from eval.loadgen.runner import LoadResult, LoadSpec
from eval.loadgen.stats import latency_samples, summarize_requests
from eval.loadgen.workloads import Conversation
from eval.server import flush_cache


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: a server URL and an optional hook run before each of its blocks
    (e.g. toggling a feature on a shared server)."""

    name: str
    base_url: str
    before_block: Callable[[], None] | None = None


@dataclass
class ABResult:
    arms: list[str]
    records: dict[str, list[dict[str, Any]]]  # arm -> records of all its blocks (with "block")
    block_summaries: dict[str, list[dict[str, Any]]]  # arm -> one summary per block
    wall_s: dict[str, float]
    flush_attempts: int = 0
    radix_flushed_between_arms: bool = True
    order: list[str] = field(default_factory=list)

    def summary(self, arm: str) -> dict[str, Any]:
        return summarize_requests(self.records[arm], self.wall_s[arm])

    def samples(self) -> dict[str, dict[str, list[float]]]:
        return {arm: latency_samples(recs) for arm, recs in self.records.items()}

    def ratio(self, key: str, treatment: str, control: str) -> float:
        """summary(treatment)[key] / summary(control)[key], e.g. ``ttft_ms_p50``."""
        return self.summary(treatment)[key] / self.summary(control)[key]


def rotation_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Arm orders for ``rounds`` rounds: round 2k is ``names`` rotated left by k, round 2k+1 its
    mirror. Three arms S, R, C: SRC, CRS, RCS, SCR, CSR, RSC; every pair of arms meets in both
    orders every two rounds, and after six rounds each arm has held every place twice."""
    if rounds < 0 or not names:
        raise ValueError(f"rotation_orders needs arms and rounds >= 0, got {list(names)}, {rounds}")
    out: list[list[str]] = []
    for r in range(rounds):
        k = (r // 2) % len(names)
        order = list(names[k:]) + list(names[:k])
        out.append(order if r % 2 == 0 else order[::-1])
    return out


def _orders(arms: Sequence[Arm], blocks: int, orders: Sequence[Sequence[str]] | None) -> list[list[Arm]]:
    if orders is None:
        return [list(arms) if r % 2 == 0 else list(reversed(arms)) for r in range(blocks)]
    by_name = {a.name: a for a in arms}
    if len(orders) != blocks or any(sorted(o) != sorted(by_name) for o in orders):
        raise ValueError(f"orders must list every arm once per round for {blocks} rounds: {orders}")
    return [[by_name[n] for n in o] for o in orders]


def run_ab(
    arms: Sequence[Arm],
    workload: Sequence[Conversation],
    block_spec: LoadSpec,
    blocks: int,
    run_block: Callable[[str, Sequence[Conversation], LoadSpec], LoadResult],
    flush: bool = True,
    orders: Sequence[Sequence[str]] | None = None,
) -> ABResult:
    """Runs ``blocks`` rounds of one ``block_spec`` session per arm (see module doc).

    ``run_block(base_url, workload, spec)`` runs one session, e.g. ``ctx.load`` or
    ``eval.loadgen.runner.run_load_sync``. Round r uses ``seed = block_spec.seed + r`` and
    conversations starting at ``r * block_spec.max_requests``. ``orders``: the arm names in order,
    one list per round (each arm once); default alternating and mirrored as in the module doc.
    """
    if len({a.name for a in arms}) != len(arms) or len(arms) < 2:
        raise ValueError("run_ab needs at least two arms with distinct names")
    out = ABResult([a.name for a in arms], {a.name: [] for a in arms}, {a.name: [] for a in arms},
                   {a.name: 0.0 for a in arms})
    for r, order in enumerate(_orders(arms, blocks, orders)):
        for arm in order:
            if flush:
                try:
                    out.flush_attempts += flush_cache(arm.base_url)
                except TimeoutError:
                    out.radix_flushed_between_arms = False
            if arm.before_block is not None:
                arm.before_block()
            spec = dataclasses.replace(block_spec, seed=block_spec.seed + r, label=f"{arm.name}#{r}",
                                       conversation_offset=block_spec.conversation_offset + r * block_spec.max_requests)
            res = run_block(arm.base_url, workload, spec)
            for rec in res.records:
                rec["block"] = r
                rec["arm"] = arm.name
            out.records[arm.name].extend(res.records)
            out.block_summaries[arm.name].append(res.summary())
            out.wall_s[arm.name] += res.wall_s
            out.order.append(arm.name)
    if not flush:
        out.radix_flushed_between_arms = False
    return out
