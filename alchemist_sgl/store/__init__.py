"""Activation store: host (and device) page pools, dedup index by chained page keys, pins.

Must not import sglang. ``ActivationStore`` is the one component; see its module's Notes.
"""

from alchemist_sgl.store.activation_store import ActivationStore, Pin
from alchemist_sgl.store.open_pages import BatchWrite

__all__ = ["ActivationStore", "BatchWrite", "Pin"]
