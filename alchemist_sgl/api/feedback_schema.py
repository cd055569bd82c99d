"""Schemas of the feedback routes (INTERFACES.md "Feedback API"), HTTP-side: bodies and store interface.

Owns the validation of ``POST /v1/feedback`` and ``POST /v1/feedback/batch`` bodies, and the
interface of the store and completion log that ``api_feedback`` codes against (``FeedbackStore``,
``CompletionLookup``; the value types ``FeedbackInput``/``FeedbackResult`` are the store's own,
from feedback/rows.py). Every rejection is a ``FieldError``
naming the field by its path (``score``, ``feedback[3].rating``), so the 422 says exactly what to
fix. Imports only the standard library, ``api_schemas`` and ``feedback.rows``; never sglang.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal, Protocol

from alchemist_sgl.api.schemas import FieldError, check_keys
from alchemist_sgl.feedback.rows import FeedbackInput, FeedbackResult  # noqa: F401 (re-exported)

CompletionState = Literal["running", "finished", "expired"]
Detokenize = Callable[[list[int]], str]

MAX_FEEDBACK_PER_BATCH = 256
MAX_FEEDBACK_ID_CHARS = 128
MAX_COMPLETION_ID_CHARS = 256
RATINGS = ("up", "down")
FEEDBACK_KEYS = ("completion_id", "choice_index", "rating", "score", "correction", "comment", "feedback_id")


class CompletionLookup(Protocol):
    """The completion log as the feedback routes read it. Called from worker threads, concurrently."""

    def state(self, rid: str, choice_index: int = 0) -> CompletionState | None:
        """None for an id never logged; ``"expired"`` for a purged one (its tombstone)."""

    def choices(self, rid: str) -> int:
        """How many choices of completion ``rid`` are logged."""


class FeedbackStore(Protocol):
    """The durable feedback store. Called from worker threads, concurrently."""

    def submit(self, fb: FeedbackInput) -> FeedbackResult:
        """Commits ``fb`` before returning (last wins per completion choice; a repeated
        ``feedback_id`` counts once and returns the first answer)."""

    def get(self, completion_id: str) -> list[dict[str, Any]]:
        """The stored feedback rows of one completion (JSON-serializable)."""

    def delete(self, completion_id: str) -> int:
        """Deletes the feedback of one completion; returns how many rows were deleted."""

    def pending_count(self) -> int:
        """Feedback stored but not yet trained."""

    def export_kto(self, completions: CompletionLookup, detokenize: Detokenize) -> Iterator[dict[str, Any]]:
        """TRL KTO rows ``{"prompt", "completion", "label"}``, lazily."""


def normalize_feedback(body: Any, path: str = "") -> dict[str, Any]:
    """One feedback object; returns all of ``FEEDBACK_KEYS`` (absent -> None, ``choice_index``
    defaulting to 0, ``score`` as a float). A null value counts as absent. Exactly one of ``rating``
    and ``score`` is required; a score of 0 is valid (stored, not trained). Raises FieldError naming
    the first bad field."""
    if not isinstance(body, dict):
        raise FieldError(path or "body", "must be a JSON object")
    check_keys(body, FEEDBACK_KEYS, path)
    given = {key: value for key, value in body.items() if value is not None}
    out: dict[str, Any] = dict.fromkeys(FEEDBACK_KEYS)
    out["completion_id"] = check_completion_id(given.get("completion_id"), _join(path, "completion_id"))

    index = given.get("choice_index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise FieldError(_join(path, "choice_index"), f"must be an integer >= 0, not {_shown(index)}")
    out["choice_index"] = index

    if "rating" in given and "score" in given:
        raise FieldError(_join(path, "score"), "give only one of rating, score (rating is given too)")
    if "rating" in given:
        if given["rating"] not in RATINGS:
            raise FieldError(_join(path, "rating"), f"must be 'up' or 'down', not {_shown(given['rating'])}")
        out["rating"] = given["rating"]
    elif "score" in given:
        out["score"] = _score(given["score"], _join(path, "score"))
    else:
        raise FieldError(_join(path, "rating"), "one of rating ('up' or 'down') or score (a number in "
                                                "[-1, 1]) is required")

    if "correction" in given:
        if not isinstance(given["correction"], str) or not given["correction"]:
            raise FieldError(_join(path, "correction"), "must be a non-empty string")
        out["correction"] = given["correction"]
    if "comment" in given:
        if not isinstance(given["comment"], str):
            raise FieldError(_join(path, "comment"), "must be a string")
        out["comment"] = given["comment"]
    if "feedback_id" in given:
        feedback_id = given["feedback_id"]
        if not isinstance(feedback_id, str) or not 1 <= len(feedback_id) <= MAX_FEEDBACK_ID_CHARS:
            raise FieldError(_join(path, "feedback_id"),
                             f"must be a string of 1 to {MAX_FEEDBACK_ID_CHARS} characters")
        out["feedback_id"] = feedback_id
    return out


def normalize_batch(body: Any) -> list[dict[str, Any]]:
    """A ``{"feedback": [...]}`` body of 1 to ``MAX_FEEDBACK_PER_BATCH`` feedback objects, each
    normalized as ``normalize_feedback`` (errors name ``feedback[i].<field>``). Every item is checked
    before any is returned, so a bad item refuses the whole batch."""
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    check_keys(body, ("feedback",), "")
    items = body.get("feedback")
    if not isinstance(items, list) or not items:
        raise FieldError("feedback", "must be a non-empty list of feedback objects")
    if len(items) > MAX_FEEDBACK_PER_BATCH:
        raise FieldError("feedback", f"at most {MAX_FEEDBACK_PER_BATCH} items per batch, got {len(items)}")
    return [normalize_feedback(item, f"feedback[{i}]") for i, item in enumerate(items)]


def check_completion_id(value: Any, field: str = "completion_id") -> str:
    """A completion id: a non-empty string of at most ``MAX_COMPLETION_ID_CHARS`` characters."""
    if value is None:
        raise FieldError(field, "is required: the `id` of a chat or completions response")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_COMPLETION_ID_CHARS:
        raise FieldError(field, f"must be a string of 1 to {MAX_COMPLETION_ID_CHARS} characters")
    return value


def _score(value: Any, field: str) -> float:
    # NaN fails the comparison too; no float() before the range check (huge ints would overflow)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
        raise FieldError(field, "must be a number in [-1, 1]")
    return float(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
