"""Whether descriptions beat their shuffled baseline by more than the spread over units, on
hand-built per-example records whose AUROCs and balanced accuracies are counted by hand."""

from __future__ import annotations

import math

from deepseemoe.explain.scorers import versus_shuffled


def _recs(pairs):
    """[(P(1), activating)] → records as the scorers save them (prediction: P(1) > 0.5)."""
    return [{"activating": a, "probability": p, "prediction": p > 0.5} for p, a in pairs]


PERFECT = _recs([(0.9, True), (0.8, True), (0.2, False), (0.1, False)])  # AUROC 1
CHANCE = _recs([(0.6, True), (0.4, True), (0.6, False), (0.4, False)])  # AUROC (1 + 0.5·2 + 0)/4 = 0.5
WRONG = _recs([(0.1, True), (0.2, True), (0.8, False), (0.9, False)])  # AUROC 0


def test_descriptions_that_beat_the_baseline_on_every_unit():
    got = versus_shuffled({0: PERFECT, 1: PERFECT}, {0: CHANCE, 1: CHANCE})
    # differences 0.5 and 0.5: gain 0.5, spread 0
    assert got["measure"] == "auroc" and got["units"] == 2
    assert math.isclose(got["gain"], 0.5) and math.isclose(got["spread"], 0.0)
    assert got["beats"] is True


def test_a_gain_within_the_spread_does_not_beat():
    got = versus_shuffled({0: PERFECT, 1: WRONG, 2: PERFECT}, {0: CHANCE, 1: CHANCE, 2: CHANCE})
    # differences 0.5, -0.5, 0.5: mean 1/6, sample standard deviation sqrt(((1/3)^2·2 + (2/3)^2)/2) = 1/sqrt(3)
    assert math.isclose(got["gain"], 1 / 6) and math.isclose(got["spread"], 1 / math.sqrt(3))
    assert got["beats"] is False


def test_one_unit_cannot_tell_and_units_without_a_baseline_are_left_out():
    got = versus_shuffled({0: PERFECT, 1: PERFECT}, {0: CHANCE})
    assert got["units"] == 1 and got["beats"] is None and got["spread"] is None
    assert versus_shuffled({}, {})["beats"] is None


def test_without_probabilities_balanced_accuracy_is_compared():
    def answers(pairs):
        return [{"activating": a, "prediction": p, "probability": None} for p, a in pairs]

    right = answers([(True, True), (False, False)])  # balanced accuracy 1
    half = answers([(True, True), (True, False)])  # 0.5
    got = versus_shuffled({0: right, 1: right}, {0: half, 1: right})
    # differences 0.5 and 0: mean 0.25, standard deviation sqrt(2·0.25²) = 0.3536
    assert got["measure"] == "balanced_accuracy"
    assert math.isclose(got["gain"], 0.25) and math.isclose(got["spread"], math.sqrt(0.125))
    assert got["beats"] is False
