"""Every bad input of tools/bad_inputs.py gets a clear error naming the argument, another clear
error of fmjax's own, or a checked correct result (issue 14): no silent wrong result, no crash
inside jax / flax / diffrax, no wrong argument named (~15 s: it compiles fits, solves and
likelihoods). Known failures would be strict xfails listed in ``KNOWN``: fixing one turns it into
an XPASS that fails until it is removed from there."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "tools" / "bad_inputs.py"
_spec = importlib.util.spec_from_file_location("bad_inputs", _PATH)
bad_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bad_inputs)

GOOD = ("named", "other-clear", "correct")
#: Cases known to fail, by outcome (strict xfails). None are left: the 16 found when the cases
#: were written (issue 14) are fixed.
KNOWN: dict[str, str] = {}


def _params():
    for c in bad_inputs.CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[c.id])] if c.id in KNOWN else []
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_answered(case):
    outcome, detail = bad_inputs.classify(case)
    assert outcome in GOOD, f"{outcome}: {detail}"


def test_cases_are_distinct_and_known_failures_are_cases():
    ids = [c.id for c in bad_inputs.CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 94
    assert set(KNOWN) <= set(ids)
