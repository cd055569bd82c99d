"""Counting the compiled and the eager calls of train/layer.py's ``joint_layer`` in tests.

``layer_calls()`` wraps ``layer._core_for`` (the one place a call picks the compiled or the eager
layer; layer.py, Note [Compiled layer]) for the duration of a ``with`` block, so production code
keeps no test counter.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from alchemist_sgl.train import layer as layer_mod


@contextlib.contextmanager
def layer_calls() -> Iterator[dict[str, int]]:
    """{"compiled": n, "eager": m}: the layer calls made inside the block, by path."""
    counts = {"compiled": 0, "eager": 0}
    original = layer_mod._core_for

    def counting(shape: layer_mod.LayerShape, is_compiled: bool) -> Callable[..., object]:
        counts["compiled" if is_compiled else "eager"] += 1
        return original(shape, is_compiled)

    layer_mod._core_for = counting
    try:
        yield counts
    finally:
        layer_mod._core_for = original
