"""The online loop: sample intake, version ids, publish cadence, gate, checkpoints, adapters.

Nothing in this package imports sglang (the scheduler seams live in integration/). The pure parts
below (import them from their modules; this package file imports nothing, so a light reader
such as the HTTP process pays only for what it uses) import only the standard library, torch, safetensors and
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
The loop itself (``OnlineLoop``, loop.py) holds a ``VersionKeeper`` (lifecycle.py) and a
``WorkSlot`` (work.py), and reaches its collaborators through the surfaces of loop_types.py; it,
the sample admission and the feedback poller are built by the composition root
(``alchemist_sgl.runtime.build_loop``), never here.
"""
