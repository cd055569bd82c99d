"""Schemas of the HTTP routes' inputs: validation and normalization, HTTP-side.

Owns every body and field check of our routes: the ``POST /alchemist/train/samples`` sample schema
and the small field checks the other admin routes share (version ids, bounded integers), and the
``POST /v1/feedback`` and ``POST /v1/feedback/batch`` bodies (docs/api.md). Every rejection is a
``FieldError`` naming the field by its path (``samples[2].score``, ``feedback[3].rating``), so the
422 says exactly what to fix. Pure: imports only the standard library, ``errors`` and
``feedback.rows`` (the store's ``FeedbackInput``); never sglang.
"""

from __future__ import annotations

import re
from typing import Mapping

from alchemist_sgl.errors import AlchemistError
from alchemist_sgl.feedback.rows import FeedbackInput

MAX_SAMPLES_PER_REQUEST = 256
ROLES = ("system", "user", "assistant")
PROMPT_KEYS = ("prompt", "messages", "prompt_ids")
RESPONSE_KEYS = ("response", "response_ids")
LABEL_KEYS = ("rating", "score")
SAMPLE_KEYS = ("prompt", "messages", "prompt_ids", "response", "response_ids", "rating", "score",
               "completion_id")
MAX_FEEDBACK_PER_BATCH = 256
MAX_FEEDBACK_ID_CHARS = 128
MAX_COMPLETION_ID_CHARS = 256
RATINGS = ("up", "down")
FEEDBACK_KEYS = ("completion_id", "choice_index", "rating", "score", "correction", "comment", "feedback_id")
_VERSION_NAME = re.compile(r"v[0-9]+")
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


class FieldError(AlchemistError):
    """A request field is invalid; ``field`` is its path (``samples[2].score``, ``limit``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def body(self) -> dict[str, str]:
        """The 422 answer: ``{"error": "<field>: <message>", "field": "<field>"}``."""
        return {"error": str(self), "field": self.field}


def check_keys(obj: Mapping[str, object], allowed: tuple[str, ...], path: str) -> None:
    """Raises FieldError for the first key of ``obj`` that is not in ``allowed``."""
    for key in obj:
        if key not in allowed:
            raise FieldError(join_path(path, str(key)), f"unknown field (expected one of {', '.join(allowed)})")


def list_body(body: object, key: str, noun: str, cap: int, unit: str) -> list[object]:
    """The list under ``key`` of a ``{key: [...]}`` body: a JSON object with no other field and 1 to
    ``cap`` items. Raises FieldError naming ``body`` or ``key``."""
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    check_keys(body, (key,), "")
    items = body.get(key)
    if not isinstance(items, list) or not items:
        raise FieldError(key, f"must be a non-empty list of {noun}")
    if len(items) > cap:
        raise FieldError(key, f"at most {cap} {unit}, got {len(items)}")
    return items


def bounded_int(raw: str | None, field: str, default: int, low: int, high: int | None = None) -> int:
    """A query-string integer in [low, high] (no upper bound when high is None); default if absent."""
    if raw is None:
        return default
    is_int = _INTEGER.fullmatch(raw) is not None
    value = int(raw) if is_int else None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise FieldError(field, f"must be an integer {bounds}, not {_shown(raw)}")
    return value


def version_name(value: object, field: str) -> str:
    """A version id such as ``v3`` (``v`` then ASCII digits)."""
    if not isinstance(value, str) or _VERSION_NAME.fullmatch(value) is None:
        raise FieldError(field, f"must be a version id such as 'v3', not {_shown(value)}")
    return value


def check_completion_id(value: object, field: str = "completion_id") -> str:
    """A completion id: a non-empty string of at most ``MAX_COMPLETION_ID_CHARS`` characters."""
    if value is None:
        raise FieldError(field, "is required: the `id` of a chat or completions response")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_COMPLETION_ID_CHARS:
        raise FieldError(field, f"must be a string of 1 to {MAX_COMPLETION_ID_CHARS} characters")
    return value


def join_path(path: str, key: str) -> str:
    """The path of ``key`` inside the object at ``path`` (``feedback[1]`` + ``score``)."""
    return f"{path}.{key}" if path else key


# ---- POST /alchemist/train/samples -----------------------------------------------------------

def normalize_samples(body: object) -> list[dict[str, object]]:
    """Validates a ``{"samples": [...]}`` body; returns each sample with all of ``SAMPLE_KEYS``
    (absent -> None, ``score`` as a float). Raises FieldError naming the first bad field."""
    samples = list_body(body, "samples", "sample objects", MAX_SAMPLES_PER_REQUEST, "samples per request")
    return [normalize_sample(sample, f"samples[{i}]") for i, sample in enumerate(samples)]


def normalize_sample(sample: object, path: str) -> dict[str, object]:
    """One sample (see ``normalize_samples``). A null value counts as absent."""
    if not isinstance(sample, dict):
        raise FieldError(path, "must be an object")
    check_keys(sample, SAMPLE_KEYS, path)
    given = {key: value for key, value in sample.items() if value is not None}
    out: dict[str, object] = dict.fromkeys(SAMPLE_KEYS)

    completion_id = given.get("completion_id")
    if completion_id is not None and (not isinstance(completion_id, str) or not completion_id):
        raise FieldError(f"{path}.completion_id", "must be a non-empty string")
    out["completion_id"] = completion_id
    has_completion = completion_id is not None

    prompt_key = _one_of(given, PROMPT_KEYS, path, is_required=not has_completion,
                         why_required="the prompt (or a completion_id whose prompt is used)")
    if prompt_key == "prompt":
        if not isinstance(given["prompt"], str):
            raise FieldError(f"{path}.prompt", "must be a string")
        out["prompt"] = given["prompt"]
    elif prompt_key == "messages":
        out["messages"] = _messages(given["messages"], f"{path}.messages")
    elif prompt_key == "prompt_ids":
        out["prompt_ids"] = _token_ids(given["prompt_ids"], f"{path}.prompt_ids")

    response_key = _one_of(given, RESPONSE_KEYS, path, is_required=not has_completion,
                           why_required="the response (or a completion_id whose output is used)")
    if response_key == "response":
        if not isinstance(given["response"], str) or not given["response"]:
            raise FieldError(f"{path}.response", "must be a non-empty string")
        out["response"] = given["response"]
    elif response_key == "response_ids":
        out["response_ids"] = _token_ids(given["response_ids"], f"{path}.response_ids")

    label_key = _one_of(given, LABEL_KEYS, path, is_required=True, why_required="the label")
    if label_key == "rating":
        if given["rating"] not in RATINGS:
            raise FieldError(f"{path}.rating", f"must be 'up' or 'down', not {_shown(given['rating'])}")
        out["rating"] = given["rating"]
    else:
        out["score"] = _score(given["score"], f"{path}.score", is_zero_ok=False)
    return out


def _one_of(given: Mapping[str, object], keys: tuple[str, ...], path: str, *, is_required: bool,
            why_required: str) -> str | None:
    present = [key for key in keys if key in given]
    if len(present) > 1:
        raise FieldError(f"{path}.{present[1]}", f"give only one of {', '.join(keys)} "
                                                 f"({present[0]} is given too)")
    if not present and is_required:
        raise FieldError(f"{path}.{keys[0]}", f"one of {', '.join(keys)} is required: {why_required}")
    return present[0] if present else None


def _messages(value: object, path: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise FieldError(path, "must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(where, "must be an object with role and content")
        check_keys(message, ("role", "content"), where)
        if message.get("role") not in ROLES:
            raise FieldError(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {_shown(message.get('role'))}")
        if not isinstance(message.get("content"), str):
            raise FieldError(f"{where}.content", "must be a string")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _token_ids(value: object, path: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise FieldError(path, "must be a non-empty list of token ids (integers >= 0)")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise FieldError(f"{path}[{i}]", f"must be a token id (an integer >= 0), not {_shown(token)}")
    return list(value)


# ---- POST /v1/feedback and /v1/feedback/batch ------------------------------------------------

def normalize_feedback(body: object, path: str = "") -> FeedbackInput:
    """One feedback object as the store's ``FeedbackInput`` (``api_key_hash`` None: the route sets
    it; ``choice_index`` defaulting to 0, ``score`` as a float). A null value counts as absent.
    Exactly one of ``rating`` and ``score`` is required; a score of 0 is valid (stored, not
    trained). Raises FieldError naming the first bad field."""
    if not isinstance(body, dict):
        raise FieldError(path or "body", "must be a JSON object")
    check_keys(body, FEEDBACK_KEYS, path)
    given = {key: value for key, value in body.items() if value is not None}
    completion_id = check_completion_id(given.get("completion_id"), join_path(path, "completion_id"))

    index = given.get("choice_index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise FieldError(join_path(path, "choice_index"), f"must be an integer >= 0, not {_shown(index)}")

    rating, score = None, None
    if "rating" in given and "score" in given:
        raise FieldError(join_path(path, "score"), "give only one of rating, score (rating is given too)")
    if "rating" in given:
        if given["rating"] not in RATINGS:
            raise FieldError(join_path(path, "rating"), f"must be 'up' or 'down', not {_shown(given['rating'])}")
        rating = str(given["rating"])
    elif "score" in given:
        score = _score(given["score"], join_path(path, "score"), is_zero_ok=True)
    else:
        raise FieldError(join_path(path, "rating"), "one of rating ('up' or 'down') or score (a number in "
                                                    "[-1, 1]) is required")
    return FeedbackInput(completion_id=completion_id, choice_index=index, rating=rating, score=score,
                         correction=_text(given, "correction", path, is_empty_ok=False),
                         comment=_text(given, "comment", path, is_empty_ok=True),
                         feedback_id=_feedback_id(given, path))


def normalize_batch(body: object) -> list[FeedbackInput]:
    """A ``{"feedback": [...]}`` body of 1 to ``MAX_FEEDBACK_PER_BATCH`` feedback objects, each
    normalized as ``normalize_feedback`` (errors name ``feedback[i].<field>``). Every item is checked
    before any is returned, so a bad item refuses the whole batch."""
    items = list_body(body, "feedback", "feedback objects", MAX_FEEDBACK_PER_BATCH, "items per batch")
    return [normalize_feedback(item, f"feedback[{i}]") for i, item in enumerate(items)]


def _text(given: Mapping[str, object], key: str, path: str, *, is_empty_ok: bool) -> str | None:
    """An optional string field (``correction`` must not be empty, ``comment`` may)."""
    if key not in given:
        return None
    value = given[key]
    if is_empty_ok and not isinstance(value, str):
        raise FieldError(join_path(path, key), "must be a string")
    if not is_empty_ok and (not isinstance(value, str) or not value):
        raise FieldError(join_path(path, key), "must be a non-empty string")
    assert isinstance(value, str)
    return value


def _feedback_id(given: Mapping[str, object], path: str) -> str | None:
    feedback_id = given.get("feedback_id")
    if feedback_id is None:
        return None
    if not isinstance(feedback_id, str) or not 1 <= len(feedback_id) <= MAX_FEEDBACK_ID_CHARS:
        raise FieldError(join_path(path, "feedback_id"),
                         f"must be a string of 1 to {MAX_FEEDBACK_ID_CHARS} characters")
    return feedback_id


# ---- shared helpers --------------------------------------------------------------------------

def _score(value: object, path: str, *, is_zero_ok: bool) -> float:
    """A score in [-1, 1]; 0 only when ``is_zero_ok`` (feedback stores it untrained; an admin
    sample with score 0 would carry no training signal)."""
    # NaN fails the comparison too; no float() before the range check (huge ints would overflow)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
        raise FieldError(path, "must be a number in [-1, 1]")
    if value == 0 and not is_zero_ok:
        raise FieldError(path, "must not be 0: a 0 score carries no training signal")
    return float(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
