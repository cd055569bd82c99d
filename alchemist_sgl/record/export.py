"""Reading a prompt's recording back out of the store, for tests and benchmarks (debug commands).

Owns the ``debug.recording`` control command's work: pin the pages covering a token sequence under
the serving namespace, copy them to a file, unpin. The file holds ``{"tokens", "namespace",
"covered", "segments"}`` where ``segments`` is ``[(start, end, {name: [layers, end-start, width]}
| None)]`` tiling the prompt, the shape of the trainer's ``PromptSegment`` list; the graph plan's
``lse`` (stored bit-cast in the model-dtype pool, core/plan.py Note [Graph plan]) is exported as
its fp32 values [layers, end-start, heads]. And ``debug.coverage``: the same summary without
reading or writing any tensor. Both take an optional ``rid``: with ``store.dedup`` false, the
recording of that request (else the latest recording of exactly those tokens; store/roots.py).
Runs on the scheduler thread between steps (control commands do), so the store is quiescent.
Imports torch and package value types only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from alchemist_sgl.core.plan import FP32_TENSORS
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.store import ActivationStore
from alchemist_sgl.store.readout import PagedRows


def debug_handlers(store: ActivationStore, serving: Callable[[], str], folder: Path
                   ) -> dict[str, Callable[[dict[str, Any]], object]]:
    """The ``debug.recording`` (a file under ``folder``) and ``debug.coverage`` commands over
    ``store``, under the serving version's namespace (``adapter`` in the payload: that adapter's)."""
    def namespace(payload: dict[str, Any]) -> Namespace:
        return Namespace(serving(), payload.get("adapter"))

    return {
        "debug.recording": lambda payload: export_recording(
            store, payload.get("tokens") or [], namespace(payload),
            folder / Path(str(payload.get("name") or "recording.pt")).name, payload.get("rid")),
        "debug.coverage": lambda payload: recording_coverage(
            store, payload.get("tokens") or [], namespace(payload), payload.get("rid")),
    }


def recording_coverage(store: ActivationStore, tokens: Sequence[int], namespace: Namespace,
                       rid: str | None = None) -> dict[str, Any]:
    """``{"tokens", "covered", "covered_tokens"}`` of the recording of ``tokens`` (no tensor read;
    lookups are not counted in the store's hits)."""
    _check_tokens(tokens)
    coverage = store.coverage(list(tokens), namespace, count_hits=False, rid=rid)
    return {"tokens": len(tokens), "covered": [list(r) for r in coverage.covered],
            "covered_tokens": coverage.covered_tokens}


def _check_tokens(tokens: Sequence[int]) -> None:
    if not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
        raise ValueError("tokens must be a non-empty list of token ids")


def export_recording(store: ActivationStore, tokens: Sequence[int], namespace: Namespace,
                     path: str | Path, rid: str | None = None) -> dict[str, Any]:
    """Writes the recording of ``tokens`` to ``path`` (atomically); returns a summary."""
    _check_tokens(tokens)
    if not str(path):
        raise ValueError("path must name the file to write")
    target = Path(path)
    pin = store.pin(list(tokens), namespace, rid=rid)
    try:
        segments = [(start, end, {k: _values(k, _tensor(v)).clone() for k, v in tensors.items()}
                     if tensors is not None else None)
                    for start, end, tensors in store.segments(pin)]
        covered = [list(r) for r in pin.coverage.covered]
    finally:
        store.unpin(pin)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save({"tokens": list(tokens), "namespace": [namespace.base_version, namespace.adapter],
                "covered": covered, "segments": segments}, tmp)
    tmp.rename(target)
    return {"path": str(target), "covered": covered, "tokens": len(tokens),
            "covered_tokens": sum(b - a for a, b in covered)}


def _tensor(rows: torch.Tensor | PagedRows) -> torch.Tensor:
    assert isinstance(rows, torch.Tensor)  # store.segments copies unless asked for lazy rows
    return rows


def _values(name: str, rows: torch.Tensor) -> torch.Tensor:
    """The rows as values: an fp32 tensor stored bit-cast in a narrower pool is viewed back as fp32."""
    if name in FP32_TENSORS and rows.dtype != torch.float32:
        return rows.view(torch.float32)
    return rows
