"""Cadence: when to publish and when to checkpoint, as pure functions of counters and time.

Owns ``should_publish`` (``publish.every_steps`` / ``publish.every_s``) and ``should_checkpoint``
(``train.checkpoint_every_steps``). Imports nothing; never torch, sglang or other package modules.
"""

from __future__ import annotations


def should_publish(steps_since_publish: int, seconds_since_publish: float, every_steps: int,
                   every_s: float) -> bool:
    """True when at least one unpublished step exists and either ``every_steps`` steps or
    ``every_s`` seconds have passed since the last publish."""
    if steps_since_publish < 1:
        return False
    return steps_since_publish >= every_steps or seconds_since_publish >= every_s


def should_checkpoint(steps_since_checkpoint: int, every_steps: int) -> bool:
    """True once ``every_steps`` optimizer steps have run since the last checkpoint."""
    return steps_since_checkpoint >= max(every_steps, 1)
