"""The publish gate: refuse a version whose held-out loss regresses too far.

Owns ``GateDecision``, the pure ``decide`` (candidate NLL against the last accepted version and
against v0) and ``load_heldout`` (the JSONL held-out set; ``None`` = the packaged
``heldout.jsonl``). Scoring itself (a forward over the held-out pairs) belongs to the trainer.
Imports only the standard library and ``alchemist_sgl.errors``; never torch, sglang, or
alchemist_sgl.train.

Note [two bounds]: a per-publish bound alone lets many small regressions add up (a slow
drift, e.g. toward sycophancy), so a candidate must also stay within ``max_regression_total`` of v0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources

from alchemist_sgl.errors import HeldoutInvalid

PACKAGED_HELDOUT = "heldout.jsonl"


@dataclass(frozen=True)
class GateDecision:
    """``metric`` is the candidate's held-out NLL (nats/token, lower is better)."""

    is_accepted: bool
    reason: str
    metric: float


def decide(candidate_nll: float, last_accepted_nll: float | None, v0_nll: float | None,
           max_regression: float, max_regression_total: float) -> GateDecision:
    """Accepts unless ``candidate > last_accepted + max_regression`` or ``candidate > v0 +
    max_regression_total`` (Note [two bounds]); a bound whose reference is None (not measured
    yet) is not checked; a non-finite candidate is refused. The reason names the numbers."""
    if not math.isfinite(candidate_nll):
        return GateDecision(False, f"held-out NLL {candidate_nll} is not finite", candidate_nll)
    failures = []
    if last_accepted_nll is not None and candidate_nll > last_accepted_nll + max_regression:
        failures.append(f"held-out NLL {candidate_nll:.4f} > last accepted {last_accepted_nll:.4f}"
                        f" + publish.gate.max_regression {max_regression:g}")
    if v0_nll is not None and candidate_nll > v0_nll + max_regression_total:
        failures.append(f"held-out NLL {candidate_nll:.4f} > v0 {v0_nll:.4f}"
                        f" + publish.gate.max_regression_total {max_regression_total:g}")
    if failures:
        return GateDecision(False, "; ".join(failures), candidate_nll)
    refs = []
    if last_accepted_nll is not None:
        refs.append(f"last accepted {last_accepted_nll:.4f} + {max_regression:g}")
    if v0_nll is not None:
        refs.append(f"v0 {v0_nll:.4f} + {max_regression_total:g}")
    within = " and ".join(refs) if refs else "no reference measured yet"
    return GateDecision(True, f"held-out NLL {candidate_nll:.4f} within {within}", candidate_nll)


def load_heldout(path: str | None) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file of ``{"prompt": str, "response": str}`` objects
    (blank lines skipped); ``None`` = the packaged set. Raises ``HeldoutInvalid`` naming the line."""
    if path is None:
        name = f"alchemist_sgl/online/{PACKAGED_HELDOUT}"
        text = resources.files("alchemist_sgl.online").joinpath(PACKAGED_HELDOUT).read_text("utf-8")
    else:
        name = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise HeldoutInvalid(path, 0, f"cannot be read ({e.strerror})") from e
    pairs: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeldoutInvalid(name, lineno, f"not JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise HeldoutInvalid(name, lineno, f"expected an object, got {type(obj).__name__}")
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise HeldoutInvalid(name, lineno, f"'{key}' must be a non-empty string")
        pairs.append((obj["prompt"], obj["response"]))
    if not pairs:
        raise HeldoutInvalid(name, 0, "holds no pairs")
    return pairs
