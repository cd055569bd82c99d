"""The store as the online loop's source of recordings: pin, read and unpin a prompt's pages.

Owns ``StoreRecordings``, the ``RecordingSource`` (online/loop_types.py) over an
``ActivationStore``: the namespace of a recording is the version that prefilled it (no adapter).
Imports the store and the shared value types only; never the online loop, never sglang.
"""

from __future__ import annotations

from typing import Callable

from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.store.activation_store import ActivationStore, Pin
from alchemist_sgl.store.readout import Segment


class StoreRecordings:
    """``RecordingSource`` over the activation store (namespace = the prefill version). Handles
    are the store's ``Pin`` objects, opaque to the loop."""

    def __init__(self, store: ActivationStore) -> None:
        self.store = store

    def pin(self, prompt_ids: list[int], version: str) -> Pin | None:
        """A pin of the prompt's recording at ``version``, or None when no row of it is covered."""
        pin = self.store.pin(list(prompt_ids), Namespace(version, None))
        if not pin.coverage.covered:
            self.store.unpin(pin)
            return None
        return pin

    def segments(self, handle: object) -> list[Segment]:
        """The pinned recording's segments, read by the trainer one layer at a time straight from
        the pages (store/readout.py, Note [Per-layer read-out]): the loop unpins only after the
        sample's last unit."""
        return self.store.segments(_pin(handle), is_lazy=True)

    def covered_tokens(self, handle: object) -> int:
        """Prompt tokens the pinned recording covers (no data read)."""
        return int(_pin(handle).coverage.covered_tokens)

    def unpin(self, handle: object) -> None:
        self.store.unpin(_pin(handle))

    def release_versions(self, is_live: Callable[[str], bool]) -> int:
        """Frees the recordings of versions ``is_live`` rejects (store Note [Store lifetime])."""
        return self.store.release_namespaces(lambda ns: is_live(ns.base_version))


def _pin(handle: object) -> Pin:
    assert isinstance(handle, Pin), f"a recording handle is a store Pin, not {type(handle).__name__}"
    return handle
