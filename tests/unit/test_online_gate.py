"""online/gate.py and online/cadence.py: gate decisions, held-out loading, cadence."""

from __future__ import annotations

import math

import pytest

from alchemist_sgl.errors import HeldoutInvalid
from alchemist_sgl.online.cadence import should_checkpoint, should_close_round
from alchemist_sgl.online.gate import decide, load_heldout


def test_gate_accepts_within_both_bounds():
    d = decide(2.04, last_accepted_nll=2.0, v0_nll=1.9, max_regression=0.05,
               max_regression_total=0.2)
    assert d.is_accepted and d.metric == 2.04 and "2.0400" in d.reason


def test_gate_refuses_a_step_regression_naming_the_numbers():
    d = decide(2.06, 2.0, 2.0, max_regression=0.05, max_regression_total=0.2)
    assert not d.is_accepted
    assert "2.0600 > last accepted 2.0000 + publish.gate.max_regression 0.05" in d.reason
    assert "v0" not in d.reason


def test_gate_refuses_drift_from_v0_even_in_small_steps():
    d = decide(2.25, 2.22, 2.0, max_regression=0.05, max_regression_total=0.2)
    assert not d.is_accepted
    assert "2.2500 > v0 2.0000 + publish.gate.max_regression_total 0.2" in d.reason


def test_gate_unmeasured_references_and_nonfinite():
    assert decide(5.0, None, None, 0.05, 0.2).is_accepted
    assert not decide(5.0, None, 4.0, 0.05, 0.2).is_accepted
    assert not decide(math.nan, 2.0, 2.0, 0.05, 0.2).is_accepted
    assert not decide(math.inf, None, None, 0.05, 0.2).is_accepted


def test_packaged_heldout_set():
    pairs = load_heldout(None)
    assert len(pairs) == 32 and len(set(pairs)) == 32
    assert all(isinstance(p, str) and p and isinstance(r, str) and r for p, r in pairs)


def test_heldout_from_a_file_and_bad_lines(tmp_path):
    good = tmp_path / "h.jsonl"
    good.write_text('{"prompt": "a?", "response": "b."}\n\n{"prompt": "c?", "response": "d."}\n')
    assert load_heldout(str(good)) == [("a?", "b."), ("c?", "d.")]
    for body, line, what in [('{"prompt": "a", "response": "b"}\n{oops\n', 2, "not JSON"),
                             ('["a", "b"]\n', 1, "expected an object"),
                             ('{"prompt": "a"}\n', 1, "'response' must be"),
                             ('{"prompt": 3, "response": "b"}\n', 1, "'prompt' must be")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(HeldoutInvalid, match=f"line {line}: {what}") as e:
            load_heldout(str(bad))
        assert e.value.line == line and str(bad) in str(e.value)
    with pytest.raises(HeldoutInvalid, match="cannot be read"):
        load_heldout(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HeldoutInvalid, match="holds no pairs"):
        load_heldout(str(tmp_path / "empty.jsonl"))


def test_cadence():
    """A round closes at round_max_samples or round_s, whichever first, never empty."""
    assert not should_close_round(0, 1e9, round_s=60.0, round_max_samples=64)
    assert not should_close_round(3, 59.9, round_s=60.0, round_max_samples=64)
    assert should_close_round(1, 60.0, round_s=60.0, round_max_samples=64)
    assert should_close_round(64, 0.0, round_s=60.0, round_max_samples=64)
    assert should_close_round(1, 0.0, round_s=60.0, round_max_samples=1)
    assert not should_checkpoint(299.0, 300.0) and should_checkpoint(300.0, 300.0)
    assert should_checkpoint(0.0, 0.0)  # 0: after every round
