"""Workload parsing: ShareGPT, chitchat-dataset, MT-Bench, synthetic shared system prompt, history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.loadgen import workloads as wl


def test_sharegpt_pairs_turns_and_merges_repeated_speakers(tmp_path: Path) -> None:
    items = [
        {"id": "a", "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "gpt", "value": "leading reply is dropped"},
            {"from": "human", "value": "hi"},
            {"from": "human", "value": "there"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "bye"},
        ]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]},
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(items))
    convs = wl.load_workload(path)
    assert len(convs) == 1
    c = convs[0]
    assert c.conv_id == "a" and c.system == "be nice"
    assert c.human_turns == ("hi\nthere", "bye")
    assert c.reference_replies == ("hello",)


def test_sharegpt_jsonl_and_roundtrip(tmp_path: Path) -> None:
    convs = [wl.Conversation("x", ("q1", "q2"), ("r1", "r2"), "sys")]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in wl.to_sharegpt(convs)))
    assert wl.load_workload(path) == convs


def test_messages_for_turn_is_the_history_so_far() -> None:
    c = wl.Conversation("x", ("q1", "q2", "q3"), ("r1", "r2"), "sys")
    msgs = wl.messages_for_turn(c, 2, ["m1", "m2"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs] == ["sys", "q1", "m1", "q2", "m2", "q3"]
    assert wl.messages_for_turn(c, 0, []) == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}]
    with pytest.raises(ValueError):
        wl.messages_for_turn(c, 2, ["m1"])
    with pytest.raises(IndexError):
        wl.messages_for_turn(c, 3, ["m1", "m2", "m3"])


def test_chitchat_groups_alternate_speakers() -> None:
    data = {"c1": {"messages": [
        [{"text": "Hello", "sender": "u"}, {"text": "how are you?", "sender": "u"}],
        [{"text": "fine", "sender": "v"}],
        [{"text": "great", "sender": "u"}],
    ]}, "c2": {"messages": [[{"text": "only one", "sender": "u"}]]}}
    convs = wl.from_chitchat(data, min_turns=2)
    assert len(convs) == 1
    assert convs[0].human_turns == ("Hello how are you?", "great")
    assert convs[0].reference_replies == ("fine",)


def test_installed_datasets_load() -> None:
    default = wl.default_workload(min_turns=2, seed=0)
    assert len(default) > 1000 and all(len(c.human_turns) >= 2 for c in default)
    assert [c.conv_id for c in default[:5]] == [c.conv_id for c in wl.default_workload(min_turns=2, seed=0)[:5]]
    mt = wl.load_workload(wl.mtbench_question_path())
    assert len(mt) == 80 and all(len(c.human_turns) == 2 and c.reference_replies == () for c in mt)
    share = wl.load_workload(wl.mtbench_sharegpt_path())
    assert len(share) == 500 and all(c.human_turns for c in share)


def test_shared_system_prompt_groups_share_one_prompt() -> None:
    convs = wl.shared_system_prompt(num_groups=3, prompts_per_group=4, system_prompt_words=50, seed=1)
    assert len(convs) == 12
    systems = {c.meta["group"]: set() for c in convs}
    for c in convs:
        systems[c.meta["group"]].add(c.system)
    assert all(len(s) == 1 for s in systems.values())
    assert len({next(iter(s)) for s in systems.values()}) == 3
    assert [c.meta["group"] for c in convs[:3]] == [0, 1, 2]  # interleaved
    assert len({c.human_turns for c in convs}) == 12
    assert wl.shared_system_prompt(num_groups=3, prompts_per_group=4, system_prompt_words=50, seed=1) == convs


def test_unknown_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a ShareGPT"):
        wl.load_workload(path)
