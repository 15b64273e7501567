"""Sparse probing (dictionaries/probing.py) on planted answers: a latent that *is* the label is found
at k = 1 with accuracy 1; latents and raw activations without the label sit near chance (0.5); the
split keeps each document on one side; the per-segment means are the hand-computed means of each
segment's rows."""

from __future__ import annotations

import numpy as np
import torch


def _planted(seed: int = 0, docs_per_label: int = 20, labels=("en", "code", "de", "ru")):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(labels, dtype=object), docs_per_label)
    n, F = len(y), 64
    latents = rng.exponential(1.0, (n, F)) * (rng.random((n, F)) < 0.2)  # sparse noise
    for j, label in enumerate(labels):  # latent 10 + j fires on its label's documents and nowhere else
        latents[:, 10 + j] = np.where(y == label, 1.0 + rng.random(n), 0.0)
    raw = rng.normal(size=(n, 16))  # no information about the label
    random_latents = rng.exponential(1.0, (n, F)) * (rng.random((n, F)) < 0.2)
    return latents, raw, y, random_latents


def test_a_planted_label_feature_is_found_at_k1_and_noise_stays_at_chance():
    from deepseemoe.dictionaries.probing import sparse_probing

    latents, raw, y, random_latents = _planted()
    r = sparse_probing(latents, raw, y, random_latents=random_latents)
    assert r["labels"] == ["code", "de", "en", "ru"] and r["documents"] == 80 and r["train"] == r["test"] == 40
    assert r["k"]["1"]["latents"] == 1.0 and r["k"]["5"]["latents"] >= 0.95  # k = 5 adds noise latents
    for k in ("1", "2", "5"):  # no information: chance, within the noise of 40 test documents
        assert 0.3 <= r["k"][k]["random"] <= 0.7, (k, r["k"][k])
        assert 0.3 <= r["k"][k]["raw_topk"] <= 0.7, (k, r["k"][k])
    assert 0.3 <= r["raw_all"] <= 0.7
    # the planted latents shuffled across documents carry nothing either
    shuffled = latents[np.random.default_rng(1).permutation(len(y))]
    assert 0.3 <= sparse_probing(shuffled, raw, y)["k"]["1"]["latents"] <= 0.7


def test_too_few_documents_per_label_is_a_note_not_a_score():
    from deepseemoe.dictionaries.probing import sparse_probing

    latents, raw, y, _ = _planted(docs_per_label=3)
    assert "note" in sparse_probing(latents, raw, y)
    assert "note" in sparse_probing(latents[:20], raw[:20], y[:20])  # one label only
    # many examples but one document per label: no split keeps a document on one side only
    latents, raw, y, _ = _planted()
    assert "note" in sparse_probing(latents, raw, y, groups=np.repeat(np.arange(4), 20))


def test_the_split_keeps_every_document_on_one_side_and_every_label_on_both():
    from deepseemoe.dictionaries.probing import _split

    rng = np.random.default_rng(0)
    docs = np.repeat(np.arange(15), rng.integers(1, 6, 15))  # 15 documents of 1–5 segments
    labels = np.asarray(["a", "b", "c"], dtype=object)[docs % 3]
    train, test = _split(labels, docs, seed=0)
    assert sorted([*train, *test]) == list(range(len(docs)))
    assert not set(docs[train]) & set(docs[test])
    for value in ("a", "b", "c"):  # 5 documents each: 2 train, 3 test
        assert len(set(docs[train][labels[train] == value])) == 2 and len(set(docs[test][labels[test] == value])) == 3


def test_segment_means_are_each_segments_mean_row():
    from deepseemoe.dictionaries.probing import SegmentPool

    g = torch.Generator().manual_seed(0)
    pool = SegmentPool()
    expected = []
    for _ in range(3):  # 2 rows of 4 tokens; documents continue across rows; -1 is padding; doc 7 unlabelled
        docs = torch.tensor([0, 0, 1, 1, 1, -1, 2, 7])
        rows = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        pool.add(docs, rows, {0: "en", 1: "de", 2: "en", 7: None}, latents=x)
        expected += [(x[:2].mean(0), "en", 0), (x[2:4].mean(0), "de", 1), (x[4:5].mean(0), "de", 1),
                     (x[6:7].mean(0), "en", 2)]
    means, labels, groups = pool.means("latents")
    assert labels.tolist() == [e[1] for e in expected] and groups.tolist() == [e[2] for e in expected]
    for got, (want, _, _) in zip(means, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
