"""The feedback guard on a live tiny server: thumbs up at v0, a round publishes v1, thumbs down at
v1, and the guard rolls back to v0 on its own (online/feedback_guard.py).

A dedicated server: the session servers publish on every sample and gate them, and a guard with
``min_ratings=4`` there would roll back under the other tests. Rounds of four samples, none closed
by time, make the publishes deterministic: the four ups are one round (v1, parent v0); the fourth
down is judged in the poll that takes it, before its sample can close a round.
"""

from __future__ import annotations

import math
import urllib.request

from tests.support.online import chat, post, status, wait_for
from tests.support.servers import dedicated_server

OVERRIDES = ("publish.gate.enabled=false", "publish.guard.enabled=true",
             "publish.guard.min_ratings=4", "publish.guard.max_increase=0",
             "train.round_max_samples=4", "train.round_s=3600")


def _thumbs(server, rating: str, topic: str) -> None:
    """Four completions served now, then a thumb on each (served first, so none of them is
    served at a version their own feedback made)."""
    ids = [chat(server, f"Tell me about {topic} number {i}.", max_tokens=4)["id"] for i in range(4)]
    for cid in ids:
        post(server, "/v1/feedback", {"completion_id": cid, "rating": rating})


def test_thumbs_down_on_a_new_version_roll_it_back_to_its_parent() -> None:
    with dedicated_server("configs/cpu-tiny.yaml", OVERRIDES) as server:
        _thumbs(server, "up", "rivers")
        s = wait_for(server, lambda s: s["weight_version"] == "v1", what="the round of ups published")
        assert s["publish"]["publishes"] == 1 and s["publish"]["guarded"] == 0
        _thumbs(server, "down", "deserts")
        s = wait_for(server, lambda s: s["publish"]["guarded"] == 1, what="the guard's rollback")

        by_name = {v["name"]: v for v in s["versions"]}
        v1, v2 = by_name["v1"], by_name["v2"]
        assert v1["state"] == "guarded" and v1["parent"] == "v0"
        assert (v2["parent"], v2["step"]) == ("v0", by_name["v0"]["step"]), "v2 is v0 served again"
        assert by_name["v0"]["ratings"] == {"up": 4, "down": 0, "n": 4, "down_rate": 0.0}
        assert v1["ratings"] == {"up": 0, "down": 4, "n": 4, "down_rate": 1.0}
        evidence = v1["guard"]
        assert evidence["parent"] == "v0" and evidence["rolled_back_to"] == "v2"
        assert evidence["ratings"] == v1["ratings"]
        assert evidence["parent_ratings"] == by_name["v0"]["ratings"]
        # 4 downs of 4 against 0 of 4: z = (5/6 - 1/6) / sqrt(2 (5/6)(1/6) / 6) = sqrt(9.6)
        assert math.isclose(evidence["z"], math.sqrt(9.6), rel_tol=1e-9)
        assert math.isclose(evidence["threshold"], 1.6448536269514715, rel_tol=1e-9)
        assert (evidence["max_increase"], evidence["alpha"], evidence["min_ratings"]) == (0.0, 0.05, 4)
        # The downs' samples train on from v2 (v0's state), never from v1.
        lineage, name = [], s["weight_version"]
        while name is not None:
            lineage.append(name)
            name = by_name[name]["parent"]
        assert "v2" in lineage and "v1" not in lineage, lineage

        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=60) as resp:
            metrics = resp.read().decode()
        assert "\nalchemist_guard_rollbacks_total 1\n" in metrics
        log = server.managed.log_path.read_text(errors="replace")
        assert "feedback guard: v1 rated worse than its parent v0" in log
        again = status(server)
        assert again["publish"]["guarded"] == 1, "one rollback per version"
