"""online/completions.py: bounded by count and by TTL on a fake clock."""

from __future__ import annotations

from alchemist_sgl.online.completions import BoundedCompletionLog, CompletionEntry, CompletionLog


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def entry(rid: str, choice: int = 0) -> CompletionEntry:
    return CompletionEntry(rid=rid, choice_index=choice, prompt_ids=(1, 2), output_ids=(3,),
                           prefill_version="v1",
                           weight_versions=({"version": "v1", "start": 0, "end": 1},),
                           finish_reason="stop", created_at=1.0, finished_at=2.0,
                           output_logprobs=(-0.5,))


def test_put_get_and_protocol():
    log = BoundedCompletionLog(max_entries=10, ttl_s=60.0, clock=Clock())
    assert isinstance(log, CompletionLog)
    log.put(entry("a"))
    log.put(entry("a", 1))
    assert log.get("a") == entry("a") and log.get("a", 1).choice_index == 1
    assert log.get("b") is None and len(log) == 2


def test_evicts_oldest_beyond_max_entries():
    log = BoundedCompletionLog(max_entries=3, ttl_s=60.0, clock=Clock())
    for rid in "abcd":
        log.put(entry(rid))
    assert log.get("a") is None and [log.get(r) is not None for r in "bcd"] == [True] * 3
    log.put(entry("b"))  # a re-put refreshes: c is now the oldest
    log.put(entry("e"))
    assert log.get("c") is None and log.get("b") is not None
    assert log.evictions == 2


def test_ttl_eviction_on_access():
    clock = Clock()
    log = BoundedCompletionLog(max_entries=10, ttl_s=10.0, clock=clock)
    log.put(entry("a"))
    clock.t = 5.0
    log.put(entry("b"))
    clock.t = 9.9
    assert len(log) == 2
    clock.t = 10.0
    assert log.get("a") is None and log.get("b") is not None and len(log) == 1
    clock.t = 15.0
    assert log.get("b") is None and len(log) == 0 and log.evictions == 2
