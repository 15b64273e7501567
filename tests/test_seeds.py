"""Mean ± sd over seeds as the tables print it."""

from __future__ import annotations

from deepseemoe.measures import apart, over_seeds, plus_minus


def test_plus_minus_prints_no_negative_zero():
    assert plus_minus(-0.00001, 0.00002, 4, signed=True) == "+0.0000 ± 0.0000"
    assert plus_minus(-0.00001, None, 4) == "0.0000"
    assert plus_minus(-0.0123, 0.001, 3, signed=True) == "-0.012 ± 0.001"
    assert plus_minus(float("nan"), 0.1) == "–"


def test_over_seeds_and_apart_by_hand():
    assert over_seeds([1.0, 3.0]) == (2.0, 2 ** 0.5)
    assert apart(1.0, 0.1, 1.5, 0.1) and not apart(1.0, 0.3, 1.5, 0.3)
