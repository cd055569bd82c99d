"""Rounds (online/loop.py, Note [Rounds]) over the real tiny Llama weights, without SGLang.

The loop is built by ``runtime.build_loop`` from ``configs/cpu-tiny.yaml`` with ``--set``
overrides; the only fakes are the ``ServingHost`` and the clock (``train.round_s``,
``train.stale_max_age_s``) from tests/support/loop_rig.py. Every number is a real training step.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest
import torch

from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.ratings import FeedbackStore
from alchemist_sgl.online.intake import PendingSample
from alchemist_sgl.train import ReplayTrainer, Sample
from tests.support.loop_rig import BIG_MS, SAMPLES, Rig, same

torch.set_num_threads(1)


def _pending(rig: Rig, prompt: str, response: str, *, version: str, age_s: float = 0.0,
             feedback_id: str | None = None) -> PendingSample:
    """A sample served at ``version`` (a thumbs-up), enqueued ``age_s`` ago."""
    [p] = rig.admission.admit([{"prompt": prompt, "response": response, "rating": "up"}])
    p.prefill_version, p.enqueued_at, p.feedback_id = version, rig.clock() - age_s, feedback_id
    if feedback_id is not None:
        p.source = "feedback"
    return p


def _fates_add_up(rig: Rig) -> None:
    """Note [Sample fates]: fed == trained + deferred + dropped + expired + pending + in round."""
    st = rig.status()["train"]
    f = st["samples_by_fate"]
    assert st["samples_fed"] == (f["trained"] + f["deferred"] + f["dropped"] + f["expired"]
                                 + st["samples_pending"] + st["samples_in_round"])


def test_a_round_takes_samples_until_round_max_samples_and_publishes_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("train.round_max_samples=3",))
    reference = ReplayTrainer(rig.weights, rig.config.train, seed=rig.config.train.seed)
    pending = rig.admission.admit([{"prompt": p, "response": r, "rating": "up"}
                                   for p, r in SAMPLES[:3]])
    batch = [Sample(p.prompt_ids, p.response_ids) for p in pending]
    stats = reference.step(batch)  # the reference step over W0, before the loop publishes into it
    assert rig.loop.offer(pending) == 3
    rig.run_idle()
    st = rig.status()["train"]
    assert rig.host.announced == ["v0", "v1"] and st["steps"] == 1
    assert st["samples_trained"] == 3 and st["samples_trained_by_lag"] == {"0": 3}
    assert rig.loop.registry.get("v1").step == 1 and st["round"]["version"] == "v1"
    # The round's loss equals one batch step's over the same samples from the same start (the
    # gradients are compared in tests/unit/test_train_rounds.py; after AdamW's first, sign-like
    # step a rounding-level gradient difference on a near-zero element moves it by 2 * lr).
    assert abs(rig.loop.counters.last_loss - stats.loss) <= 1e-6 * abs(stats.loss)
    assert same(rig.live(), rig.expected_live())
    _fates_add_up(rig)


def test_a_round_closes_at_round_s_and_never_empty(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("train.round_s=10",))
    rig.clock.now += 100.0
    assert not rig.loop.has_work and rig.loop.run_slice(BIG_MS).units == 0
    assert rig.host.announced == ["v0"]  # an empty round never closes
    rig.clock.now -= 100.0
    rig = Rig(tmp_path / "ckpt2", ("train.round_s=10", "train.round_max_samples=64"))
    rig.loop.offer(rig.admission.admit([{"prompt": "Hi", "response": "Yo", "rating": "up"}]))
    rig.run_idle()
    st = rig.status()["train"]
    assert st["samples_in_round"] == 1 and st["steps"] == 0 and not rig.loop.has_work
    assert 0.0 < st["round"]["closes_in_s"] <= 10.0
    rig.clock.now += 10.0
    assert rig.loop.has_work
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1"] and rig.status()["train"]["steps"] == 1
    fp = rig.status()["train"]["feedback_to_publish_s"]
    assert fp["p50"] == fp["p90"] == 10.0  # intake to publish on the loop's clock


def test_fresh_first_then_stale_recomputed_counted_by_lag(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("train.round_max_samples=2",))
    loop = rig.loop
    loop.offer(rig.admission.admit([{"prompt": p, "response": r, "rating": "up"}
                                    for p, r in SAMPLES[:2]]))
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1"]
    # Queued oldest first: two stale (served at v0), then a fresh one (served at v1).
    stale = [_pending(rig, *SAMPLES[2], version="v0"), _pending(rig, *SAMPLES[3], version="v0")]
    fresh = _pending(rig, *SAMPLES[4], version="v1")
    loop.offer(stale + [fresh])
    order = []
    for _ in range(2):  # the first two takes of the round at v1
        work = loop._next_work()
        next(work)
        order.append(loop._inflight[0].prompt_ids)
        for _kind in work:
            pass
    assert order == [fresh.prompt_ids, stale[0].prompt_ids]  # fresh, then the OLDEST stale
    rig.run_idle()
    st = rig.status()["train"]
    assert st["samples_trained_by_lag"] == {"0": 3, "1": 1} and st["samples_in_round"] == 1
    rig.clock.now += 60.0  # train.round_s: the round at v2 closes with the last stale sample
    rig.run_idle()
    st = rig.status()["train"]
    assert st["samples_trained_by_lag"] == {"0": 3, "1": 1, "2": 1}  # it waited a round more
    assert st["prompt_tokens_by_fate"]["stale_recomputed"] == sum(
        len(p.prompt_ids) for p in stale)
    _fates_add_up(rig)


class DeferralSpy(FeedbackStore):
    """A real feedback store that also lists the ids the loop defers (through the poller)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.deferred: list[list[str]] = []

    def mark_deferred(self, feedback_ids: list[str]) -> None:
        self.deferred.append(list(feedback_ids))
        super().mark_deferred(feedback_ids)


def test_stale_samples_past_max_age_are_deferred_or_dropped_at_publish(tmp_path: Path) -> None:
    spy = DeferralSpy(tmp_path / "feedback.sqlite")
    rig = Rig(tmp_path / "ckpt", ("train.stale_max_age_s=30",), feedback=spy,
              completions=SqliteCompletionLog(tmp_path / "feedback.sqlite", ttl_s=3600.0))
    loop = rig.loop
    deferred = spy.deferred
    loop.offer(rig.admission.admit([{"prompt": "Hi", "response": "Yo", "rating": "up"}]))
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1"]
    old_admin = _pending(rig, *SAMPLES[0], version="v0", age_s=31.0)
    old_feedback = _pending(rig, *SAMPLES[1], version="v0", age_s=31.0, feedback_id="fb-1")
    young_stale = _pending(rig, *SAMPLES[2], version="v0", age_s=29.0)
    fresh = _pending(rig, *SAMPLES[3], version="v1", age_s=40.0)  # old but fresh: kept
    loop.offer([old_admin, old_feedback, young_stale, fresh])
    for _ in range(2):  # the fresh one first; then its round closes and publishes v2
        for _kind in loop._next_work():
            pass
    assert rig.host.announced[-1] == "v2"
    assert deferred == [["fb-1"]]
    st = rig.status()["train"]
    assert st["samples_by_fate"]["deferred"] == 1 and st["samples_by_fate"]["dropped"] == 1
    assert [p.prompt_ids for p in loop.queue] == [young_stale.prompt_ids]
    _fates_add_up(rig)
    rig.run_idle()
    _fates_add_up(rig)
    assert rig.status()["train"]["samples_by_fate"]["trained"] == 3


def test_a_checkpoint_keeps_the_open_rounds_samples_as_pending(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt", ("train.round_max_samples=64",))
    rig.loop.offer(rig.admission.admit([{"prompt": p, "response": r, "rating": "up"}
                                        for p, r in SAMPLES[:2]]))
    rig.run_idle()
    assert rig.status()["train"]["samples_in_round"] == 2 and rig.loop.trainer.counters.steps == 0
    rig.loop.checkpoint(is_blocking=True)
    again = Rig(tmp_path / "ckpt", ("train.round_max_samples=64",))
    assert len(again.loop.queue) == 2 and again.status()["train"]["samples_fed"] == 2
    _fates_add_up(again)


def test_replay_switch_applies_from_the_next_round(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "ckpt")
    loop = rig.loop
    loop.offer(rig.admission.admit([{"prompt": "Hi", "response": "Yo", "rating": "up"}]))
    loop.run_slice(0.001)  # the round at v0 is open, with replay on
    assert loop.set_replay(False) == {"replay": False, "current_round_replay": True}
    rig.run_idle()
    assert rig.status()["train"]["round"]["replay"] is False and rig.host.announced[-1] == "v1"


def test_the_grads_dump_leaves_the_open_rounds_gradients_as_they_were(tmp_path: Path) -> None:
    from alchemist_sgl.online.commands import _dump_grads

    rig = Rig(tmp_path / "ckpt", ("train.round_max_samples=64",))
    rig.loop.offer(rig.admission.admit([{"prompt": "Hi", "response": "Yo", "rating": "up"}]))
    rig.run_idle()
    before = [None if p.grad is None else p.grad.clone()
              for p in rig.loop.trainer.adapter.parameters()]
    assert any(g is not None for g in before)
    out = _dump_grads(rig.loop, rig.admission, {"sample": {"prompt": "Hello", "response": "there",
                                                           "rating": "up"}}, tmp_path / "var")
    assert out["loss"] > 0 and out["recomputed_tokens"] == len(tokenize_ids("Hello"))
    after = [p.grad for p in rig.loop.trainer.adapter.parameters()]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before, after))
    rig.clock.now += 60.0
    rig.run_idle()
    assert rig.status()["train"]["steps"] == 1 and rig.status()["train"]["samples_trained"] == 1


def tokenize_ids(text: str) -> list[int]:
    from tests.support.loop_rig import tokenize
    return tokenize(text)


def test_debug_round_s_changes_when_the_open_round_closes(tmp_path: Path) -> None:
    from alchemist_sgl.online.commands import CommandError, _set_round_s

    rig = Rig(tmp_path / "ckpt", ("train.round_max_samples=64", "train.round_s=60"))
    rig.loop.offer(rig.admission.admit([{"prompt": "Hi", "response": "Yo", "rating": "up"}]))
    rig.run_idle()
    rig.clock.now += 20.0
    assert not rig.loop.has_work
    assert _set_round_s(rig.loop, {"round_s": 15}) == {"round_s": 15.0}
    assert rig.loop.has_work and rig.status()["train"]["round"]["round_s"] == 15.0
    rig.run_idle()
    assert rig.host.announced == ["v0", "v1"]
    for bad in (0, -1, "15", True, None):
        with pytest.raises(CommandError):
            _set_round_s(rig.loop, {"round_s": bad})
