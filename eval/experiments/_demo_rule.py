"""The ``demo`` experiment's simulated user (pure: no HTTP, no model).

The rewarded behaviour is an opening phrase: an answer is good when it starts with ``PHRASE``
(case and leading blanks ignored). The user rates a good answer ``up`` (SFT on the model's own
answer) and a bad one ``down`` with a ``correction``: the phrase, then the first sentence(s) of the
model's own answer, so the correction teaches the opener without teaching a new answer (SFT on the
correction after the original prompt, docs/online-loop.md). An opener, not a sign-off: the demo's
answers are cut at a few dozen tokens to fit its time, and a sign-off after a cut answer would be
neither generated nor seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PHRASE = "Alchemist here!"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentences(text: str, max_sentences: int = 2, max_chars: int = 200) -> str:
    """The first ``max_sentences`` sentences of ``text`` (split after ``.``, ``!`` or ``?`` and a
    blank), whitespace collapsed, cut at a word boundary to ``max_chars``; "" for a blank text."""
    flat = " ".join(text.split())
    if not flat:
        return ""
    head = " ".join(_SENTENCE_END.split(flat)[:max_sentences])
    if len(head) <= max_chars:
        return head
    cut = head[:max_chars]
    return cut[:cut.rfind(" ")] if " " in cut else cut


@dataclass(frozen=True)
class OpenerRule:
    """Rewards answers that open with ``phrase``."""

    phrase: str = PHRASE
    max_sentences: int = 2

    def has(self, text: str) -> bool:
        return text.lstrip().lower().startswith(self.phrase.lower())

    def corrected(self, text: str) -> str:
        """The answer the user wanted: the phrase, then the answer's first sentence(s) (the answer
        itself when it has the phrase already)."""
        if self.has(text):
            return text.strip()
        head = first_sentences(text, self.max_sentences)
        return f"{self.phrase} {head}" if head else self.phrase

    def feedback(self, completion_id: str, text: str) -> dict[str, Any]:
        """The ``POST /v1/feedback`` body for the answer ``text`` of ``completion_id``."""
        if self.has(text):
            return {"completion_id": completion_id, "rating": "up"}
        return {"completion_id": completion_id, "rating": "down", "correction": self.corrected(text)}


def rate(rule: OpenerRule, answers: list[str]) -> float | None:
    """Share of ``answers`` that show the behaviour (None for none)."""
    return sum(rule.has(a) for a in answers) / len(answers) if answers else None


def moved_up(before: float | None, after: float | None) -> bool:
    """Whether a measure where higher is better went up (False when either is missing)."""
    return before is not None and after is not None and after > before
