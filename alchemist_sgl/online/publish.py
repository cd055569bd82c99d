"""Publishing a trained adapter into the served weights: master copy, staged build, one copy.

Owns ``MasterWeights`` (the host copy of W0 for every projection a LoRA target lives in) and
``Publisher`` (builds ``cast(W0 + s * B @ A)`` per layer into staging buffers, one layer per work
unit, then copies all of it into the live tensors at one quiescent point). Imports torch and the
trainer's value types only; it never imports sglang: the live tensors arrive as ``BaseWeights``
built in ``integration/`` over the served model's own parameters.

Note [Rebuild from the master]: serving at version v means the live target tensors hold
``cast(W0 + s * B_v @ A_v)``. Each publish recomputes that from W0 in fp32 and casts once, never
``W += dW`` into the live tensors (in bf16 most of a one-step delta would be rounded away). The
same master and the same adapter tensors give the same bits, so a rollback is exact.

Note [One copy point]: the build runs in work units while serving goes on, so it writes into
staging buffers the model never reads. ``commit`` copies every staged tensor into the live ones
in one go; the caller runs it between scheduler iterations, when no forward reads the weights and
no chunked prefill is in flight (a prefill must not span two versions). Its time is the publish
stall. Staging buffers are kept for the next publish (no allocation per publish).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from alchemist_sgl.train.spec import TARGET_TO_PROJECTION
from alchemist_sgl.train.weights import BaseWeights


class MasterWeights:
    """W0 of the target projections, copied to host memory once at startup (the live tensors'
    dtype, i.e. the checkpoint's precision as served). ``tensors[layer][projection]`` [out, in]."""

    def __init__(self, live: BaseWeights, targets: tuple[str, ...]) -> None:
        self.projections = tuple(sorted({TARGET_TO_PROJECTION[t] for t in targets}))
        self.tensors: list[dict[str, torch.Tensor]] = [
            {p: lw.projection(p).detach().to("cpu", copy=True) for p in self.projections}
            for lw in live.layers]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.tensors for t in layer.values())


def merged_tensor(master: torch.Tensor, pairs: list[tuple[str, torch.Tensor, torch.Tensor]],
                  scale: float, spec: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """``cast(W0 + scale * B @ A)`` for one fused projection (Note [Rebuild from the master]).

    ``master`` [out, in] W0; ``pairs`` (target, A [r, in], B [rows_t, r]) of the targets living in
    this projection; rows without a target are W0 unchanged. Computed in fp32, cast to W0's dtype.
    """
    merged = master.float().clone()
    for target, a, b in pairs:
        start, end = spec.target_rows(target)
        merged[start:end] += scale * (b.float() @ a.float())
    if out is None:
        return merged.to(master.dtype)
    out.copy_(merged)
    return out


class Publisher:
    """Builds and commits published weights; one per process (Note [One copy point])."""

    def __init__(self, master: MasterWeights, live: BaseWeights) -> None:
        self.master, self.live = master, live
        self._staging: list[dict[str, torch.Tensor]] | None = None
        self._frozen: Any = None
        self._next_layer = 0

    def begin(self, frozen: Any) -> None:
        """Starts a build of ``frozen`` (a ``FrozenLora``: ``pairs(layer, projection)``, ``scale``)."""
        if self._staging is None:
            self._staging = [{p: torch.empty_like(t) for p, t in layer.items()}
                             for layer in self.master.tensors]
        self._frozen, self._next_layer = frozen, 0

    @property
    def is_built(self) -> bool:
        return self._frozen is not None and self._next_layer >= len(self.master.tensors)

    def run_unit(self) -> None:
        """Builds the next layer's staged tensors (one work unit)."""
        assert self._frozen is not None and self._staging is not None and not self.is_built
        layer = self._next_layer
        for proj, w0 in self.master.tensors[layer].items():
            merged_tensor(w0, self._frozen.pairs(layer, proj), self._frozen.scale,
                          self.live.spec, out=self._staging[layer][proj])
        self._next_layer += 1

    def commit(self) -> float:
        """Copies the staged tensors into the live ones in place; returns the stall in ms.
        Quiescence required: no forward may read the weights meanwhile."""
        assert self.is_built and self._staging is not None
        t0 = time.perf_counter()
        with torch.no_grad():
            for layer, lw in enumerate(self.live.layers):
                for proj, staged in self._staging[layer].items():
                    lw.projection(proj).copy_(staged)
        self._frozen = None
        return (time.perf_counter() - t0) * 1000.0

    def abandon(self) -> None:
        self._frozen = None

    def build_all(self, frozen: Any) -> None:
        """The whole build at once (rollback and restore, which answer in one call)."""
        self.begin(frozen)
        while not self.is_built:
            self.run_unit()
