"""The ``demo`` experiment's simulated user (pure: no HTTP, no model).

The rewarded behaviour is an opening phrase: an answer is good when it starts with ``PHRASE``
(case and leading blanks ignored), says it only once, and goes on to answer. The user rates a good
answer ``up`` (SFT on the model's own answer) and any other ``down`` with a ``correction``: the
phrase, then the first sentence(s) of the model's own answer with the phrase taken out (or of a
reference reply when nothing is left), so the correction teaches the opener without teaching a new
answer (SFT on the correction after the original prompt, docs/online-loop.md), and an answer that
only repeats the phrase is corrected back to an answer. An opener, not a sign-off: the demo's
answers are cut at a few dozen tokens to fit its time, and a sign-off after a cut answer would be
neither generated nor seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PHRASE = "Alchemist here!"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentences(text: str, max_sentences: int = 3, max_chars: int = 300) -> str:
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
    """Rewards answers that open with ``phrase``, once, followed by an answer."""

    phrase: str = PHRASE
    max_sentences: int = 3

    def has(self, text: str) -> bool:
        """The answer opens with the phrase."""
        return text.lstrip().lower().startswith(self.phrase.lower())

    def rest(self, text: str) -> str:
        """The answer with every occurrence of the phrase taken out, whitespace collapsed."""
        return " ".join(re.sub(re.escape(self.phrase), " ", text, flags=re.IGNORECASE).split())

    def good(self, text: str) -> bool:
        """The rewarded behaviour: the phrase opens the answer, once, and an answer follows."""
        return self.has(text) and text.lower().count(self.phrase.lower()) == 1 and bool(self.rest(text))

    def corrected(self, text: str, fallback: str = "") -> str | None:
        """The answer the user wanted: the phrase, then the first sentence(s) of the answer without
        the phrase (of ``fallback``, e.g. a reference reply, when nothing else is left); None when
        neither has any text (the phrase alone would teach to stop after it)."""
        head = first_sentences(self.rest(text), self.max_sentences) or first_sentences(fallback, self.max_sentences)
        return f"{self.phrase} {head}" if head else None

    def feedback(self, completion_id: str, text: str, fallback: str = "") -> dict[str, Any]:
        """The ``POST /v1/feedback`` body for the answer ``text`` of ``completion_id``: ``up`` for a
        good answer, else ``down`` with the correction (a bare ``down`` when there is none)."""
        if self.good(text):
            return {"completion_id": completion_id, "rating": "up"}
        body = {"completion_id": completion_id, "rating": "down"}
        correction = self.corrected(text, fallback)
        return body if correction is None else {**body, "correction": correction}


def rate(rule: OpenerRule, answers: list[str]) -> float | None:
    """Share of ``answers`` that show the rewarded behaviour (``good``; None for none)."""
    return sum(rule.good(a) for a in answers) / len(answers) if answers else None


def moved_up(before: float | None, after: float | None) -> bool:
    """Whether a measure where higher is better went up (False when either is missing)."""
    return before is not None and after is not None and after > before
