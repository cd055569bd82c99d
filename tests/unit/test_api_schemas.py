"""api/schemas.py: the training-sample schema of POST /alchemist/train/samples and the feedback
body of POST /v1/feedback (/batch); every rejection names its field."""

from __future__ import annotations

from typing import Any

import pytest

from alchemist_sgl.api.schemas import (MAX_SAMPLES_PER_REQUEST, SAMPLE_KEYS, FieldError, bounded_int, normalize_batch,
                                       normalize_feedback, normalize_samples)
from alchemist_sgl.feedback import FeedbackInput

GOOD = {"prompt": "hi", "response": "hello", "rating": "up"}


def _normalized(**given: Any) -> dict[str, Any]:
    return {**dict.fromkeys(SAMPLE_KEYS), **given}


def test_every_prompt_response_and_label_form_normalizes() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    samples = normalize_samples({"samples": [
        GOOD,
        {"messages": messages, "response_ids": [5, 0], "score": -1},
        {"prompt_ids": [0, 7], "response": "ok", "score": 0.25},
        {"completion_id": "chatcmpl-1", "rating": "down"},
        {"completion_id": "cmpl-2", "prompt": "", "response": "r", "score": 1, "messages": None},
    ]})
    assert samples == [
        _normalized(prompt="hi", response="hello", rating="up"),
        _normalized(messages=messages, response_ids=[5, 0], score=-1.0),
        _normalized(prompt_ids=[0, 7], response="ok", score=0.25),
        _normalized(completion_id="chatcmpl-1", rating="down"),
        _normalized(completion_id="cmpl-2", prompt="", response="r", score=1.0),
    ]
    assert isinstance(samples[1]["score"], float)


@pytest.mark.parametrize("sample, field", [
    # the object and its keys
    ("hi", "samples[0]"),
    ({**GOOD, "label": 1}, "samples[0].label"),
    # prompt: exactly one of prompt / messages / prompt_ids, unless completion_id
    ({"response": "r", "rating": "up"}, "samples[0].prompt"),
    ({**GOOD, "messages": [{"role": "user", "content": "x"}]}, "samples[0].messages"),
    ({**GOOD, "prompt_ids": [1]}, "samples[0].prompt_ids"),
    ({**GOOD, "prompt": 3}, "samples[0].prompt"),
    ({**GOOD, "prompt": None, "messages": []}, "samples[0].messages"),
    ({**GOOD, "prompt": None, "messages": "hi"}, "samples[0].messages"),
    ({**GOOD, "prompt": None, "messages": ["hi"]}, "samples[0].messages[0]"),
    ({**GOOD, "prompt": None, "messages": [{"role": "tool", "content": "x"}]}, "samples[0].messages[0].role"),
    ({**GOOD, "prompt": None, "messages": [{"content": "x"}]}, "samples[0].messages[0].role"),
    ({**GOOD, "prompt": None, "messages": [{"role": "user", "content": "a"}, {"role": "user"}]},
     "samples[0].messages[1].content"),
    ({**GOOD, "prompt": None, "messages": [{"role": "user", "content": 1}]}, "samples[0].messages[0].content"),
    ({**GOOD, "prompt": None, "messages": [{"role": "user", "content": "a", "name": "n"}]},
     "samples[0].messages[0].name"),
    ({**GOOD, "prompt": None, "prompt_ids": []}, "samples[0].prompt_ids"),
    ({**GOOD, "prompt": None, "prompt_ids": "1 2"}, "samples[0].prompt_ids"),
    ({**GOOD, "prompt": None, "prompt_ids": [1, -1]}, "samples[0].prompt_ids[1]"),
    ({**GOOD, "prompt": None, "prompt_ids": [1, 2.0]}, "samples[0].prompt_ids[1]"),
    ({**GOOD, "prompt": None, "prompt_ids": [True]}, "samples[0].prompt_ids[0]"),
    # response: at most one of response / response_ids, required unless completion_id
    ({"prompt": "p", "rating": "up"}, "samples[0].response"),
    ({**GOOD, "response_ids": [1]}, "samples[0].response_ids"),
    ({**GOOD, "response": ""}, "samples[0].response"),
    ({**GOOD, "response": ["a"]}, "samples[0].response"),
    ({**GOOD, "response": None, "response_ids": []}, "samples[0].response_ids"),
    ({**GOOD, "response": None, "response_ids": [3, "4"]}, "samples[0].response_ids[1]"),
    # label: exactly one of rating / score
    ({"prompt": "p", "response": "r"}, "samples[0].rating"),
    ({**GOOD, "score": 0.5}, "samples[0].score"),
    ({**GOOD, "rating": "meh"}, "samples[0].rating"),
    ({**GOOD, "rating": True}, "samples[0].rating"),
    ({**GOOD, "rating": None, "score": 0}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": 0.0}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": 1.5}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": -2}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": True}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": "0.5"}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": float("nan")}, "samples[0].score"),
    ({**GOOD, "rating": None, "score": 10 ** 400}, "samples[0].score"),
    # completion_id
    ({**GOOD, "completion_id": ""}, "samples[0].completion_id"),
    ({**GOOD, "completion_id": 7}, "samples[0].completion_id"),
    ({"completion_id": "c"}, "samples[0].rating"),
])
def test_bad_sample_names_its_field(sample: Any, field: str) -> None:
    with pytest.raises(FieldError) as caught:
        normalize_samples({"samples": [sample]})
    assert caught.value.field == field
    assert caught.value.body() == {"error": str(caught.value), "field": field}
    assert str(caught.value).startswith(f"{field}: ")


def test_a_zero_score_says_why() -> None:
    with pytest.raises(FieldError, match="no training signal"):
        normalize_samples({"samples": [{**GOOD, "rating": None, "score": 0}]})


@pytest.mark.parametrize("body, field", [
    ([GOOD], "body"),
    ({}, "samples"),
    ({"samples": []}, "samples"),
    ({"samples": GOOD}, "samples"),
    ({"samples": [GOOD] * (MAX_SAMPLES_PER_REQUEST + 1)}, "samples"),
    ({"samples": [GOOD], "dry_run": True}, "dry_run"),
    ({"samples": [GOOD, GOOD, {**GOOD, "rating": None, "score": 2}]}, "samples[2].score"),
])
def test_bad_body_names_its_field(body: Any, field: str) -> None:
    with pytest.raises(FieldError) as caught:
        normalize_samples(body)
    assert caught.value.field == field


def test_the_sample_limit_is_inclusive() -> None:
    assert len(normalize_samples({"samples": [GOOD] * MAX_SAMPLES_PER_REQUEST})) == MAX_SAMPLES_PER_REQUEST


def test_bounded_int() -> None:
    assert bounded_int(None, "limit", 50, 1, 500) == 50
    assert bounded_int("+7", "offset", 0, 0) == 7
    for raw in ("", " 1", "1e3", "0x10", "1_0", "9" * 30):
        with pytest.raises(FieldError):
            bounded_int(raw, "offset", 0, 0)


def test_a_feedback_body_normalizes_to_the_stores_input() -> None:
    fb = normalize_feedback({"completion_id": "c", "score": 1, "comment": "", "choice_index": None})
    assert fb == FeedbackInput(completion_id="c", choice_index=0, score=1.0, comment="")
    assert isinstance(fb.score, float) and fb.api_key_hash is None, "the route sets the key's hash"
    assert normalize_feedback({"completion_id": "c", "score": 0}).score == 0.0, "stored, never trained"
    [first, second] = normalize_batch({"feedback": [{"completion_id": "a", "rating": "up"},
                                                    {"completion_id": "b", "rating": "down",
                                                     "correction": "fixed", "feedback_id": "f"}]})
    assert (first.completion_id, first.rating) == ("a", "up")
    assert (second.rating, second.correction, second.feedback_id) == ("down", "fixed", "f")


def test_one_score_rule_with_zero_refused_only_for_admin_samples() -> None:
    """Both schemas share one score check: [-1, 1], no bool, no NaN; 0 is a stored feedback score
    but an admin sample without a training signal."""
    for bad in (1.5, -2, True, float("nan"), "0.5", 10 ** 400):
        with pytest.raises(FieldError, match=r"^score: must be a number in \[-1, 1\]$"):
            normalize_feedback({"completion_id": "c", "score": bad})
        with pytest.raises(FieldError, match=r"^samples\[0\]\.score: must be a number in \[-1, 1\]$"):
            normalize_samples({"samples": [{**GOOD, "rating": None, "score": bad}]})
    with pytest.raises(FieldError, match="must not be 0"):
        normalize_samples({"samples": [{**GOOD, "rating": None, "score": 0}]})
