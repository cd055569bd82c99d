"""The online loop: sample intake, version ids, publish cadence, gate, checkpoints, adapters.

Nothing in this package imports sglang (the scheduler seams live in integration/). The pure parts
below, re-exported here, import only the standard library, torch, safetensors and
alchemist_sgl.config / errors / log (never alchemist_sgl.train); the modules that compose the
trainer into a loop import them, not the other way round. Pure API:
  * ``VersionInfo`` / ``VersionRegistry`` / ``read_serving_name`` / ``ServingVersionReader``
    (versions.py): monotonic, never-reused version ids, lineage and lag, persisted atomically.
  * ``PendingSample`` / ``SampleQueue`` (intake.py): the bounded queue of training samples.
  * ``CompletionEntry`` / ``CompletionLog`` / ``BoundedCompletionLog`` (completions.py).
  * ``CheckpointMeta`` / ``CheckpointStore`` (checkpoint.py): atomic training checkpoints.
  * ``save_adapter`` / ``load_adapter`` / ``prune_plan`` (adapters.py): PEFT folders per version.
  * ``GateDecision`` / ``decide`` / ``load_heldout`` (gate.py): the held-out regression gate.
  * ``should_publish`` / ``should_checkpoint`` (cadence.py).
"""

from alchemist_sgl.online.adapters import load_adapter, load_adapter_config, prune_plan, save_adapter
from alchemist_sgl.online.cadence import should_checkpoint, should_publish
from alchemist_sgl.online.checkpoint import CheckpointMeta, CheckpointStore
from alchemist_sgl.online.completions import BoundedCompletionLog, CompletionEntry, CompletionLog
from alchemist_sgl.online.gate import GateDecision, decide, load_heldout
from alchemist_sgl.online.intake import PendingSample, SampleQueue
from alchemist_sgl.online.versions import (ServingVersionReader, VersionInfo, VersionRegistry,
                                           read_serving_name)

__all__ = ["BoundedCompletionLog", "CheckpointMeta", "CheckpointStore", "CompletionEntry",
           "CompletionLog", "GateDecision", "PendingSample", "SampleQueue", "ServingVersionReader",
           "VersionInfo", "VersionRegistry", "decide", "load_adapter", "load_adapter_config",
           "load_heldout", "prune_plan", "read_serving_name", "save_adapter",
           "should_checkpoint", "should_publish"]
