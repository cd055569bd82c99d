"""Simulated users: a rule-based reward on each response and a policy that turns it into feedback.

Owns ``RewardRule`` (keyword / brevity rewards in [-1, 1]), ``FeedbackPolicy`` (probability of
giving feedback, and whether it is a rating, a score or a correction) which builds the
``POST /v1/feedback`` body of docs/api.md ("Feedback"), and ``FeedbackTally`` which counts
the answers. A 404 from the route itself (FastAPI's ``{"detail": "Not Found"}``: the server has no
such route) is counted as ``route_unavailable``; a 404 with any other body is the route saying
"unknown completion" and is counted under its status. Pure except ``FeedbackTally.post``, which
does the HTTP call. Must not import the server runtime or sglang.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

ROUTE_NOT_FOUND_BODY = {"detail": "Not Found"}


@dataclass(frozen=True)
class RewardRule:
    """``keyword``: +1 if ``keyword`` occurs (case-insensitive) in the response, else -1.
    ``brevity``: +1 up to ``max_words`` words, falling linearly to -1 at twice that."""

    kind: Literal["keyword", "brevity"] = "keyword"
    keyword: str = "certainly"
    max_words: int = 20

    def reward(self, text: str) -> float:
        if self.kind == "keyword":
            return 1.0 if self.keyword.lower() in text.lower() else -1.0
        if self.kind == "brevity":
            n = len(text.split())
            if n <= self.max_words:
                return 1.0
            return max(-1.0, 1.0 - 2.0 * (n - self.max_words) / self.max_words)
        raise ValueError(f"unknown reward rule kind {self.kind!r}")

    def corrected(self, text: str) -> str:
        """The response this user wanted instead of ``text``."""
        if self.kind == "keyword":
            return f"{self.keyword.capitalize()}! {text.strip()}"
        words = text.split()
        return " ".join(words[: self.max_words])


@dataclass(frozen=True)
class FeedbackPolicy:
    """Each successful response gets feedback with ``probability``. ``kind``:
    ``rating``: "up" when reward > ``threshold`` else "down"; ``score``: the reward itself;
    ``correction``: "up" when reward > threshold, else "down" plus the rule's corrected response."""

    probability: float = 0.5
    rule: RewardRule = field(default_factory=RewardRule)
    kind: Literal["rating", "score", "correction"] = "rating"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"feedback probability must be in [0, 1], got {self.probability}")
        if self.kind not in ("rating", "score", "correction"):
            raise ValueError(f"unknown feedback kind {self.kind!r}")

    def body(self, completion_id: str, text: str, rng: random.Random) -> dict[str, Any] | None:
        """The ``/v1/feedback`` body for this response, or None when this user gives no feedback.
        Draws exactly one number from ``rng`` per call (reproducible for a seed)."""
        if rng.random() >= self.probability:
            return None
        reward = self.rule.reward(text)
        body: dict[str, Any] = {"completion_id": completion_id, "choice_index": 0}
        if self.kind == "score":
            body["score"] = max(-1.0, min(1.0, reward))
        else:
            body["rating"] = "up" if reward > self.threshold else "down"
            if self.kind == "correction" and body["rating"] == "down":
                body["correction"] = self.rule.corrected(text)
        return body


@dataclass
class FeedbackTally:
    """Counts of feedback posted and how the server answered (mutable, one per run)."""

    attempted: int = 0
    accepted: int = 0
    route_unavailable: int = 0
    transport_errors: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def record(self, status: int | None, payload: Any) -> str:
        """Counts one answer; returns the outcome label stored on the request record."""
        self.attempted += 1
        if status is None:
            self.transport_errors += 1
            return "transport_error"
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
        if status == 404 and payload == ROUTE_NOT_FOUND_BODY:
            self.route_unavailable += 1
            return "feedback route unavailable"
        if 200 <= status < 300:
            self.accepted += 1
            return "accepted"
        return f"http {status}"

    async def post(self, client: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> str:
        try:
            resp = await client.post(f"{base_url}/v1/feedback", json=body)
        except httpx.HTTPError:
            return self.record(None, None)
        try:
            payload = resp.json()
        except ValueError:
            payload = resp.text
        return self.record(resp.status_code, payload)

    def summary(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "accepted": self.accepted,
            "route_unavailable": self.route_unavailable,
            "transport_errors": self.transport_errors,
            "by_status": dict(self.by_status),
        }
