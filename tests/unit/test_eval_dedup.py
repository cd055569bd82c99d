"""eval/experiments/dedup.py, the parts without a server: unique prompt tokens and the ideal
ratio (against a set of prefixes, an independent count), the field assembly, the workloads and the
drivers that send them (the without arm resends exactly the with arm's prompts)."""

from __future__ import annotations

import math
import random

import pytest

from eval.experiments import dedup
from eval.loadgen.workloads import Conversation


def _prefixes(prompts: list[list[int]]) -> int:
    return len({tuple(p[:i + 1]) for p in prompts for i in range(len(p))})


def test_unique_prefix_tokens_counts_prefix_tree_positions() -> None:
    assert dedup.unique_prefix_tokens([]) == 0
    assert dedup.unique_prefix_tokens([[1, 2, 3], [1, 2, 3]]) == 3
    assert dedup.unique_prefix_tokens([[1, 2, 3], [1, 2, 4], [5, 2, 3]]) == 3 + 1 + 3
    # A later token equal to an earlier prompt's is new when what precedes it differs.
    assert dedup.unique_prefix_tokens([[7, 8], [8]]) == 3
    rng = random.Random(0)
    system = [rng.randrange(50) for _ in range(30)]
    prompts = [system[:rng.randrange(31)] + [rng.randrange(5) for _ in range(rng.randrange(12))]
               for _ in range(40)]
    assert dedup.unique_prefix_tokens(prompts) == _prefixes(prompts)


def test_ideal_ratio_is_tokens_sent_over_unique_tokens() -> None:
    system = list(range(100))
    prompts = [system + [1000 + i, 2000 + i] for i in range(4)]  # 102 tokens each, 100 shared
    assert dedup.ideal_ratio(prompts) == pytest.approx(4 * 102 / (100 + 4 * 2))
    turns = [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]  # each turn extends the last
    assert dedup.ideal_ratio(turns) == pytest.approx(12 / 6)
    assert math.isnan(dedup.ideal_ratio([]))


def test_workload_fields_from_two_arms() -> None:
    prompts = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    arms = {"with": {"bytes": 7 * 10, "covered": [4, 7], "cached": 4},
            "without": {"bytes": 12 * 10, "covered": [4, 8], "cached": 0}}
    f = dedup.workload_fields(prompts, arms, bytes_per_token=10)
    assert f["requests"] == 2 and f["prompt_tokens"] == 12 and f["unique_prompt_tokens"] == 8
    assert f["bytes_with_dedup"] == 70 and f["bytes_without_dedup"] == 120
    assert f["ratio"] == pytest.approx(120 / 70)
    assert f["ideal_ratio"] == pytest.approx(12 / 8)
    assert f["coverage_with_dedup"] == pytest.approx(11 / 12)
    assert f["coverage_without_dedup"] == 1.0
    assert f["stored_tokens_with_dedup"] == 7 and f["stored_tokens_without_dedup"] == 12
    assert f["cached_tokens_with_dedup"] == 4 and f["cached_tokens_without_dedup"] == 0
    with pytest.raises(ValueError):
        dedup.workload_fields(prompts, {**arms, "with": {**arms["with"], "covered": [4]}}, 10)


def _conv(i: int, turns: int = 3) -> Conversation:
    return Conversation(f"c{i}", tuple(f"user {i}.{t} word word" for t in range(turns)),
                        tuple(f"reply {i}.{t}" for t in range(turns)))


def test_shared_system_conversations_share_one_system_prompt() -> None:
    convs = [_conv(i) for i in range(40)]
    shared = dedup.shared_system_conversations(convs, 5, system_words=60)
    assert len(shared) == 5 and len({c.system for c in shared}) == 1
    assert shared[0].system is not None
    transcript = shared[0].system.split("for context:\n", 1)[1]
    assert len(transcript.split()) == 60
    assert all(len(c.human_turns) == 1 for c in shared)
    assert len({c.human_turns[0] for c in shared}) == 5
    # No question comes from a conversation whose text is in the system prompt.
    assert not any(c.human_turns[0].split()[1] in transcript.split() for c in shared)
    with pytest.raises(ValueError):
        dedup.shared_system_conversations(convs[:3], 5, system_words=60)


def _template(messages: list[dict[str, str]]) -> list[int]:
    """A stand-in chat template: one token per word, a marker per message."""
    ids: list[int] = []
    for m in messages:
        ids.append(-1 if m["role"] == "user" else -2)
        ids += [sum(map(ord, w)) for w in m["content"].split()]
    return ids + [-2]


def test_multi_turn_prompts_hold_the_servers_replies_and_replay_resends_them() -> None:
    convs = [_conv(0), _conv(1, turns=2)]
    sent: list[list[int]] = []

    def send(ids: list[int]) -> str:
        sent.append(ids)
        return f"server says {len(sent)}"

    prompts = dedup.multi_turn_driver(convs, 3, _template)(send)
    assert len(prompts) == 3 + 2 and sent == prompts
    assert prompts[1][:len(prompts[0]) - 1] == prompts[0][:-1]  # turn 2 extends turn 1 ...
    assert _template([{"role": "assistant", "content": "server says 1"}])[:-1] == \
        prompts[1][len(prompts[0]) - 1:len(prompts[0]) + 3]   # ... with the server's reply
    again: list[list[int]] = []
    assert dedup.replay_driver(prompts)(lambda ids: again.append(ids) or "other") == prompts
    assert again == prompts
    single = dedup.single_turn_driver(convs, _template)(lambda ids: "x")
    assert single == [_template([{"role": "user", "content": c.human_turns[0]}]) for c in convs]


def _arm(prompts: dict[str, list[list[int]]], store: dict[str, int]) -> dict:
    measured = {name: {"bytes": 10 * sum(map(len, p)), "covered": [len(x) for x in p], "cached": 0}
                for name, p in prompts.items()}
    return {"prompts": prompts, "measured": measured, "store": store,
            "plan": {"tensors": ["down"], "bytes_per_token": 10}}


def test_assemble_reports_store_counters_and_refuses_other_prompts() -> None:
    prompts = {"multi_turn": [[1, 2], [1, 2, 3]], "shared_system_prompt": [[4, 5], [4, 6]]}
    clean = {"evictions": 0, "demotions": 0, "bytes_stored": 90}
    out = dedup.assemble(_arm(prompts, clean), _arm(prompts, clean), dedup.QUICK)
    assert out["store_clean"] and out["problems"] == []
    assert out["multi_turn"]["ratio"] == 1.0 and out["plan"] == ["down"]
    assert out["bytes_per_token"] == 10
    out = dedup.assemble(_arm(prompts, clean), _arm(prompts, {**clean, "evictions": 3}), dedup.QUICK)
    assert not out["store_clean"] and out["problems"] == ["without: store.evictions = 3"]
    other = {**prompts, "multi_turn": [[1, 2], [1, 2, 9]]}
    with pytest.raises(RuntimeError):
        dedup.assemble(_arm(prompts, clean), _arm(other, clean), dedup.QUICK)
