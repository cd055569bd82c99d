"""The ``demo`` experiment's simulated user: the opener rule, its corrections and feedback bodies."""

from __future__ import annotations

from eval.experiments._demo_rule import OpenerRule, first_sentences, moved_up, rate

RULE = OpenerRule(phrase="Alchemist here!")


def test_first_sentences_cuts_after_sentence_ends_and_at_a_word() -> None:
    assert first_sentences("One.  Two!\nThree? Four.", 2) == "One. Two!"
    assert first_sentences("no end at all", 2) == "no end at all"
    assert first_sentences("   \n ") == ""
    assert first_sentences("aaa bbb ccc", 2, max_chars=6) == "aaa"


def test_good_needs_the_opener_once_and_an_answer_after_it() -> None:
    assert RULE.good("  alchemist HERE! Sure, here you go.")
    assert not RULE.good("Sure. Alchemist here!")            # not at the start
    assert not RULE.good("Alchemist here!")                  # nothing after it
    assert not RULE.good("Alchemist here! Alchemist here!")  # said twice
    assert RULE.has("Alchemist here! Alchemist here!") and not RULE.has("Hi. Alchemist here!")


def test_corrections_add_the_opener_to_the_answer_and_are_good() -> None:
    fixed = RULE.corrected("Awesome! That is a great idea. More text. And more. Even more.")
    assert fixed == "Alchemist here! Awesome! That is a great idea. More text."
    assert RULE.good(fixed)
    # A collapsed answer is corrected back to an answer: the reference reply fills in.
    assert RULE.corrected("Alchemist here! Alchemist here!", "lol hi. how are you?") == "Alchemist here! lol hi. how are you?"
    assert RULE.corrected("Alchemist here!", "") is None      # never the phrase alone


def test_feedback_bodies_follow_the_feedback_api() -> None:
    assert RULE.feedback("c1", "Alchemist here! Yes.") == {"completion_id": "c1", "rating": "up"}
    down = RULE.feedback("c2", "Yes.")
    assert down == {"completion_id": "c2", "rating": "down", "correction": "Alchemist here! Yes."}
    assert RULE.feedback("c3", "  ") == {"completion_id": "c3", "rating": "down"}


def test_rate_and_direction() -> None:
    assert rate(RULE, ["Alchemist here! Yes.", "No.", "Alchemist here!", "x"]) == 0.25
    assert rate(RULE, []) is None
    assert moved_up(-5.0, -1.0) and not moved_up(-1.0, -5.0) and not moved_up(None, 1.0)
