"""Sparse probing of a dictionary's latents (SAEBench's definition), on the labels the corpus has.

One example is one segment of a document: its tokens in one evaluation context (at most ctx_len;
SAEBench's examples are texts of that length), with the latents (and the raw activations the
dictionary reads) averaged over those tokens and the document's domain as the label. For every
label value, one-vs-rest: the segments are split in half *by document* (stratified, seeded: no
document has segments on both sides, so a probe cannot recognise a document instead of its label),
the k latents whose mean differs most between the two classes on the training half are chosen, a
logistic regression is fitted on those k, and its balanced accuracy on the test half is the score;
the scores are averaged over the label values. Beside it, the same probe on the raw activations —
its k best dimensions, and all of them (what a dictionary's k latents are measured against) — and
on the latents of a random dictionary of the same shape (the baseline that says whether a score
means anything). Balanced accuracy, so that 0.5 is chance whatever the class sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

KS = (1, 2, 5)


@dataclass
class SegmentPool:
    """Per-segment sums of latents and of raw activations over the segment's tokens, its document
    and its label."""

    sums: dict[str, dict[tuple, torch.Tensor]] = field(default_factory=dict)  # what -> segment -> [dim]
    counts: dict[tuple, int] = field(default_factory=dict)
    labels: dict[tuple, str] = field(default_factory=dict)
    batches: int = 0

    def add(self, docs: torch.Tensor, rows: torch.Tensor, domains: dict[int, str | None], **values: torch.Tensor) -> None:
        """One batch: `docs` and `rows` ([T]) the document id and context row of each token;
        `values`: name -> [T, dim] (latents, raw, ...). Unlabelled documents and padding are skipped."""
        docs, rows = docs.cpu(), rows.cpu()
        key = docs * (int(rows.max()) + 1 if len(rows) else 1) + rows  # one id per (document, row)
        for k in key.unique().tolist():
            sel = key == k
            d = int(docs[sel][0])
            label = domains.get(d)
            if d < 0 or not label:
                continue
            seg = (self.batches, int(rows[sel][0]), d)
            self.counts[seg] = int(sel.sum())
            self.labels[seg] = label
            for name, x in values.items():
                self.sums.setdefault(name, {})[seg] = x[sel.to(x.device)].double().sum(0).cpu()
        self.batches += 1

    def means(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[N, dim] mean per labelled segment, the N labels and the N documents (segments in order)."""
        segs = sorted(self.counts)
        x = torch.stack([self.sums[name][s] / self.counts[s] for s in segs]).numpy() if segs else np.zeros((0, 0))
        return x, np.asarray([self.labels[s] for s in segs], dtype=object), np.asarray([s[2] for s in segs])


def _top_k(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns whose class means differ most (SAEBench's selection)."""
    diff = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def _probe(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    scale = StandardScaler().fit(x_train)
    model = LogisticRegression(class_weight="balanced", max_iter=2000)
    model.fit(scale.transform(x_train), y_train)
    return float(balanced_accuracy_score(y_test, model.predict(scale.transform(x_test))))


def _split(labels: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half of each label's documents (at least one) train, the others test: indices of segments."""
    rng = np.random.default_rng(seed)
    train_docs = set()
    for value in sorted(set(labels.tolist())):
        docs = np.unique(groups[labels == value])
        rng.shuffle(docs)
        train_docs.update(docs[:max(1, len(docs) // 2)].tolist())
    in_train = np.isin(groups, list(train_docs))
    return np.nonzero(in_train)[0], np.nonzero(~in_train)[0]


def sparse_probing(latents: np.ndarray, raw: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, *,
                   random_latents: np.ndarray | None = None, ks: tuple[int, ...] = KS, seed: int = 0) -> dict:
    """Scores of the probes (module docstring) on one split; `groups`: each example's document (None:
    every example its own); `random_latents`: the same examples through a random dictionary of the
    same shape. Label values with fewer than 2 documents or 4 examples, or fewer than 2 label values
    left, give a note instead of scores."""
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    usable = [v for v in sorted(set(labels.tolist()))
              if (labels == v).sum() >= 4 and len(np.unique(groups[labels == v])) >= 2]
    if len(usable) < 2:
        seen = {v: f"{int((labels == v).sum())} examples of {len(np.unique(groups[labels == v]))} documents"
                for v in sorted(set(labels.tolist()))}
        return {"note": f"sparse probing needs ≥ 2 labels with ≥ 2 documents and ≥ 4 examples each; this text has "
                        f"{seen or 'no labels'}"}
    keep = np.isin(labels, usable)
    idx = np.nonzero(keep)[0]
    tr, te = _split(labels[idx], groups[idx], seed)
    train, test = idx[tr], idx[te]
    inputs = {"latents": latents, "raw_topk": raw}
    if random_latents is not None:
        inputs["random"] = random_latents
    scores: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in inputs}
    full = []
    for value in usable:
        y = labels == value
        for name, x in inputs.items():
            for k in ks:
                cols = _top_k(x[train], y[train], k)
                scores[name][k].append(_probe(x[train][:, cols], y[train], x[test][:, cols], y[test]))
        full.append(_probe(raw[train], y[train], raw[test], y[test]))
    return {"labels": [str(v) for v in usable], "examples": int(keep.sum()),
            "documents": len(np.unique(groups[idx])), "train": len(train), "test": len(test),
            "k": {str(k): {name: float(np.mean(scores[name][k])) for name in inputs} for k in ks},
            "raw_all": float(np.mean(full)), "raw_dims": int(raw.shape[1]), "seed": seed}
