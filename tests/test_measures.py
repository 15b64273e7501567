"""The one definition of entropy and NMI against scikit-learn's and a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from deepseemoe.measures import entropy, mutual_information, normalised_entropy


def test_entropy_by_hand():
    assert entropy(np.array([1, 1, 2])) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert entropy(np.array([0, 5, 0])) == 0.0
    assert normalised_entropy(np.array([3, 3, 3, 3])) == pytest.approx(1.0)
    np.testing.assert_allclose(entropy(np.array([[1, 1], [1, 0]]), axis=1), [math.log(2), 0.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, 500)
    b = (a + rng.integers(0, 3, 500)) % 5
    joint = np.zeros((4, 5))
    np.add.at(joint, (a, b), 1)
    assert mutual_information(joint)[1] == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def test_nmi_of_constant_labelings_follows_scikit_learn():
    assert mutual_information(np.array([[7.0]]))[1] == normalized_mutual_info_score([0] * 7, [0] * 7) == 1.0
    assert mutual_information(np.array([[3.0, 4.0]]))[1] == normalized_mutual_info_score([0] * 7, [0] * 3 + [1] * 4) == 0.0
