"""Sparse probing checked against SAEBench's own code (`sae-bench`, installed without its model
dependencies by scripts/setup.sh --test): on the same examples and the same train/test halves,
SAEBench's k-sparse selection (`get_top_k_mean_diff_mask`) picks the latents ours picks, and its
probe (`train_sklearn_probe`, accuracy on a balanced test half, where accuracy and our balanced
accuracy are the same quantity) scores what ours scores, to the tolerance that our standardising of
the k inputs before the L2-regularised fit allows (measured: at most 0.005 apart)."""

from __future__ import annotations

import numpy as np
import pytest
import sae_bench.evals.sparse_probing.probe_training as probe_training
import torch

from deepseemoe.dictionaries.probing import _probe, _top_k


def _examples(seed: int, n: int = 400, f: int = 64):
    """Balanced labels; a few latents carry the label with noise of different strengths."""
    rng = np.random.default_rng(seed)
    y = np.repeat([True, False], n // 2)
    x = np.abs(rng.normal(size=(n, f))).astype(np.float32)
    for col, strength in ((3, 0.9), (17, 0.6), (40, 0.4), (55, 0.2)):
        x[:, col] += strength * y
    train = np.concatenate([np.arange(0, n // 4), np.arange(n // 2, 3 * n // 4)])  # balanced halves
    test = np.setdiff1d(np.arange(n), train)
    return x, y, train, test


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_sparse_probing_equals_saebench(seed, k):
    x, y, train, test = _examples(seed)
    ours_cols = _top_k(x[train], y[train], k)
    mask = probe_training.get_top_k_mean_diff_mask(torch.from_numpy(x[train]), torch.from_numpy(y[train].astype(np.int64)), k)
    assert sorted(ours_cols.tolist()) == sorted(torch.nonzero(~mask).flatten().tolist())

    ours = _probe(x[train][:, ours_cols], y[train], x[test][:, ours_cols], y[test])
    reduce = probe_training.apply_topk_mask_reduce_dim
    _, theirs = probe_training.train_sklearn_probe(
        reduce(torch.from_numpy(x[train]), mask), torch.from_numpy(y[train].astype(np.int64)),
        reduce(torch.from_numpy(x[test]), mask), torch.from_numpy(y[test].astype(np.int64)))
    assert 0.55 < theirs < 1.0  # neither chance nor trivial: the comparison has something to compare
    assert ours == pytest.approx(theirs, abs=0.01)
