"""Expert alignment on planted codes and routing, answers by hand: features that fire exactly where
an expert is chosen are aligned, and their domain is their expert's; the untrained dictionary and
the shuffled routing (same load, same firing counts) are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepseemoe.dictionaries.alignment import AlignmentCounts, concentration


def test_concentration_by_hand():
    fe = np.array([[6, 2, 2, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=float)
    np.testing.assert_allclose(concentration(fe, 2), [0.8, 0.5, 0.0])


def test_planted_features_are_aligned_and_the_baselines_are_not():
    rng = np.random.default_rng(0)
    T, E, K = 4000, 8, 2
    domain_a = rng.random(T) < 0.5
    # domain a routes to two of experts 0-3, domain b to two of 4-7
    experts = np.stack([rng.choice(4, 2, replace=False) + (0 if a else 4) for a in domain_a])
    has = lambda e: torch.tensor((experts == e).any(1))  # noqa: E731
    planted = torch.stack([has(0), has(4), has(1), has(5)], 1).float()  # [T, 4]: feature f fires with its expert
    random = (torch.rand(T, 4, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    counts = AlignmentCounts(4, E, K)
    domains = ["a" if a else "b" for a in domain_a]
    for s in range(0, T, 500):  # in batches, as evaluate feeds it
        counts.add(planted[s:s + 500], random[s:s + 500], torch.tensor(experts[s:s + 500]), domains[s:s + 500])
    r = counts.result()
    assert r["trained"]["live"] == 4 and r["trained"]["aligned_share"] == 1.0
    # by hand: half of a feature's slots on its expert, the other half over 3 → top-2 ≈ 1/2 + 1/6
    assert r["trained"]["mean_concentration"] == pytest.approx(2 / 3, abs=0.03)
    assert r["trained"]["domain_nmi"] == pytest.approx(1.0)
    assert r["shuffled"]["aligned_share"] == 0.0 and r["random"]["aligned_share"] == 0.0
    assert r["shuffled"]["mean_concentration"] < 0.4 and r["uniform_concentration"] == K / E
    assert r["shuffled"]["domain_nmi"] < 0.5
