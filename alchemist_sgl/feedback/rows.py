"""Value types of the feedback store: what a client submits, what it is answered, what is kept.

Owns ``FeedbackInput`` (with its validation, each error naming the field), ``FeedbackResult``,
``FeedbackRow`` and the label rule. Imports only the standard library and alchemist_sgl.errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from alchemist_sgl.errors import FeedbackInvalid

Label = Literal["up", "down", "score", "correction"]
RowState = Literal["pending", "queued", "trained", "replaced", "deleted"]
LABELS: tuple[str, ...] = ("up", "down", "score", "correction")
STATES: tuple[str, ...] = ("pending", "queued", "deferred", "trained", "replaced", "deleted")


@dataclass(frozen=True)
class FeedbackInput:
    """One feedback as the route hands it over (``choice_index`` range is the route's check).

    At least one of ``rating``, ``score`` or ``correction``; not both ``rating`` and ``score``
    (docs/api.md, "Feedback", asks for exactly one; a bare correction is accepted here).
    """

    completion_id: str
    choice_index: int = 0
    rating: str | None = None
    score: float | None = None
    correction: str | None = None
    comment: str | None = None
    feedback_id: str | None = None
    api_key_hash: str | None = None

    def validate(self) -> None:
        """Raises ``FeedbackInvalid`` naming the first bad field."""
        if not isinstance(self.completion_id, str) or not self.completion_id:
            raise FeedbackInvalid("completion_id", "must be a non-empty string")
        if (not isinstance(self.choice_index, int) or isinstance(self.choice_index, bool)
                or self.choice_index < 0):
            raise FeedbackInvalid("choice_index", f"must be an int >= 0, got {self.choice_index!r}")
        if self.rating is not None and self.rating not in ("up", "down"):
            raise FeedbackInvalid("rating", f"must be 'up' or 'down', got {self.rating!r}")
        if self.score is not None:
            if (not isinstance(self.score, (int, float)) or isinstance(self.score, bool)
                    or not math.isfinite(self.score) or not -1.0 <= self.score <= 1.0):
                raise FeedbackInvalid("score", f"must be a number in [-1, 1], got {self.score!r}")
            if self.rating is not None:
                raise FeedbackInvalid("score", "give either rating or score, not both")
        for name in ("correction", "comment", "feedback_id", "api_key_hash"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise FeedbackInvalid(name, f"must be a string, got {type(value).__name__}")
        if self.correction is not None and not self.correction:
            raise FeedbackInvalid("correction", "must not be empty")
        if self.feedback_id is not None and not self.feedback_id:
            raise FeedbackInvalid("feedback_id", "must not be empty")
        if self.rating is None and self.score is None and self.correction is None:
            raise FeedbackInvalid("rating", "one of rating, score or correction is required")

    @property
    def label(self) -> Label:
        """"correction" when a correction is given (SFT on it), else the rating, else "score"."""
        if self.correction is not None:
            return "correction"
        if self.rating is not None:
            return self.rating  # type: ignore[return-value]
        return "score"


@dataclass(frozen=True)
class FeedbackResult:
    """``status``: what this call did ("duplicate": a replay, nothing stored); ``answer``: the
    body to send, ``{feedback_id, completion_id, status}``, the first answer on a replay."""

    feedback_id: str
    completion_id: str
    status: Literal["accepted", "replaced", "duplicate"]
    answer: dict[str, object]


@dataclass(frozen=True)
class FeedbackRow:
    """One stored feedback. ``trained_step``: the step that trained it. ``retracted_as``:
    "replaced" | "deleted" when the client retracted it after it was trained (Note [trained rows
    are facts] in store.py); the state stays "trained"."""

    feedback_id: str
    completion_id: str
    choice_index: int
    label: Label
    rating: str | None
    score: float | None
    correction: str | None
    comment: str | None
    created_at: float
    api_key_hash: str | None
    state: RowState
    trained_step: int | None
    retracted_as: str | None


ROW_COLUMNS = ("feedback_id, completion_id, choice_index, label, rating, score, correction, "
               "comment, created_at, api_key_hash, state, trained_step, retracted_as")
