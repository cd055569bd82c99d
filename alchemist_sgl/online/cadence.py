"""Cadence: when a round closes and when to checkpoint, as pure functions of counts and time.

Owns ``should_close_round`` (``train.round_s`` / ``train.round_max_samples``) and
``should_checkpoint`` (``train.checkpoint_every_s``). Imports nothing; never torch, sglang or other
package modules.
"""

from __future__ import annotations


def should_close_round(samples: int, seconds_open: float, round_s: float,
                       round_max_samples: int) -> bool:
    """True when the round holds at least one sample and either ``round_max_samples`` samples or
    ``round_s`` seconds since it opened have been reached (a round never closes empty)."""
    if samples < 1:
        return False
    return samples >= round_max_samples or seconds_open >= round_s


def should_checkpoint(seconds_since_checkpoint: float, every_s: float) -> bool:
    """True once ``every_s`` seconds have passed since the last checkpoint (0: after every round)."""
    return seconds_since_checkpoint >= every_s
