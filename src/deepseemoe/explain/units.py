"""The examples a unit is explained and scored on.

A unit is a dictionary feature (its activation on each token) or an MoE expert (its gate weight on
each token routed to it, 0 elsewhere). The text is cut into windows of `window` tokens within a
sequence; every window goes, by a seeded draw, to the *explaining* half or the *scoring* half, so no
example the explainer saw is ever scored.

Per unit (delphi's sampling, on our halves):
- train: the `n_top` windows of the explaining half with the largest activation, plus `n_quantile`
  drawn evenly over its activation quantiles — what the explainer is shown;
- test: activating windows of the scoring half, `n_test` drawn evenly over `n_quantiles` quantiles
  (each remembers its quantile: delphi's `distance`);
- not_active: scoring-half windows where the unit is silent: random ones, and hard ones — windows
  holding the unit's most frequent activating token where it stays silent.

Shapes: tokens [N] (all sequences laid end to end), seq_start [S+1] offsets, activations [N, U].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Example:
    tokens: list[str]  # each token's text
    activations: list[float]  # the unit's activation per token (0: silent)
    quantile: int = -1  # activating: its quantile bin (0 = the weakest); -1 random, -2 hard non-activating

    @property
    def activating(self) -> bool:
        return max(self.activations, default=0.0) > 0

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class UnitExamples:
    unit: int
    train: list[Example]
    test: list[Example]
    not_active: list[Example]
    top_tokens: list[tuple[str, int]] = field(default_factory=list)  # (text, activating count), explaining half


@dataclass
class Corpus:
    """Token ids of sequences laid end to end, with a text for every id."""

    tokens: np.ndarray  # [N] int
    seq_start: np.ndarray  # [S+1] offsets into tokens
    texts: list[str] | dict[int, str]  # token id -> its text

    def windows(self, width: int) -> np.ndarray:
        """[W, 2] (start, end) of consecutive windows of at most `width` tokens inside each sequence."""
        out = []
        for a, b in zip(self.seq_start[:-1], self.seq_start[1:], strict=True):
            out += [(s, min(s + width, b)) for s in range(int(a), int(b), width)]
        return np.array(out, dtype=np.int64).reshape(-1, 2)

    def text_of(self, ids) -> list[str]:
        return [self.texts[int(i)] for i in ids]


class Sampler:
    """Windows, their halves and per-unit maxima over one corpus and one activation matrix."""

    def __init__(self, corpus: Corpus, activations: np.ndarray, *, window: int = 24, seed: int = 0):
        self.corpus, self.acts = corpus, activations
        self.win = corpus.windows(window)
        starts = self.win[:, 0]
        self.wmax = np.maximum.reduceat(activations, starts, axis=0) if len(starts) else np.zeros((0, activations.shape[1]))
        rng = np.random.default_rng(seed)
        self.scoring = rng.random(len(self.win)) < 0.5  # True: scoring half; False: explaining half
        self.seed = seed

    def example(self, w: int, unit: int, quantile: int = -1) -> Example:
        a, b = self.win[w]
        return Example(self.corpus.text_of(self.corpus.tokens[a:b]), [float(v) for v in self.acts[a:b, unit]],
                       quantile)

    def unit_examples(self, unit: int, *, n_top: int = 10, n_quantile: int = 10, n_test: int = 20,
                      n_quantiles: int = 5, n_random: int = 10, n_hard: int = 10) -> UnitExamples:
        rng = np.random.default_rng(self.seed * 100_003 + unit)
        m = self.wmax[:, unit]
        active = m > 0
        explain = np.flatnonzero(active & ~self.scoring)
        explain = explain[np.argsort(-m[explain], kind="stable")]
        train = [self.example(w, unit) for w in explain[:n_top]]
        rest = explain[n_top:]
        train += [self.example(w, unit) for w in _evenly(rest[::-1], n_quantile)]  # weakest → strongest
        scored = np.flatnonzero(active & self.scoring)
        test = []
        if len(scored):
            order = scored[np.argsort(m[scored], kind="stable")]  # weakest first: bin 0 = lowest quantile
            bins = np.array_split(order, min(n_quantiles, len(order)))
            per_bin = max(1, n_test // len(bins))
            for q, b in enumerate(bins):
                take = rng.choice(b, size=min(per_bin, len(b)), replace=False)
                test += [self.example(int(w), unit, q) for w in take]
        silent = np.flatnonzero(~active & self.scoring)
        random_picks = rng.choice(silent, size=min(n_random, len(silent)), replace=False)
        not_active = [self.example(int(w), unit, -1) for w in random_picks]
        silent = np.setdiff1d(silent, random_picks)  # a window is scored once
        # hard: the unit's most frequent activating token, in scoring windows where the unit is silent
        top = self._top_tokens(unit, explain)
        if top and len(silent):
            token_id = top[0][0]
            a, b = self.win[silent, 0], self.win[silent, 1]
            has = np.array([token_id in self.corpus.tokens[s:e] for s, e in zip(a, b, strict=True)], dtype=bool)
            chosen = set(int(w) for w in rng.choice(silent[has], size=min(n_hard, int(has.sum())), replace=False))
            not_active += [self.example(w, unit, -2) for w in sorted(chosen)]
        return UnitExamples(unit, train, test, not_active,
                            [(self.corpus.texts[int(t)], n) for t, n in top[:10]])

    def _top_tokens(self, unit: int, windows: np.ndarray) -> list[tuple[int, int]]:
        counts: dict[int, int] = {}
        for w in windows:
            a, b = self.win[w]
            for t in self.corpus.tokens[a:b][self.acts[a:b, unit] > 0]:
                counts[int(t)] = counts.get(int(t), 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _evenly(items: np.ndarray, n: int) -> list[int]:
    """n items spread evenly over `items` (all of them when there are fewer)."""
    if len(items) <= n:
        return [int(i) for i in items]
    return [int(items[i]) for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


@dataclass
class TokenExample:
    """One token in its left context, for routing prediction: is this token routed to the expert?"""

    tokens: list[str]  # the context, the token last
    routed: bool
    weight: float
    token_id: int


def routing_examples(sampler: Sampler, unit: int, *, n: int = 40, context: int = 12) -> list[TokenExample]:
    """Held-out tokens of the scoring half, half of them routed to the expert, half not (balanced)."""
    rng = np.random.default_rng(sampler.seed * 7_919 + unit)
    mask = np.zeros(len(sampler.corpus.tokens), dtype=bool)
    for w in np.flatnonzero(sampler.scoring):
        a, b = sampler.win[w]
        mask[a:b] = True
    routed = sampler.acts[:, unit] > 0
    pos, neg = np.flatnonzero(mask & routed), np.flatnonzero(mask & ~routed)
    k = min(n // 2, len(pos), len(neg))
    picks = [*rng.choice(pos, size=k, replace=False), *rng.choice(neg, size=k, replace=False)]
    starts = np.searchsorted(sampler.corpus.seq_start, picks, side="right") - 1
    out = []
    for t, s in zip(picks, starts, strict=True):
        a = max(int(sampler.corpus.seq_start[s]), int(t) - context + 1)
        out.append(TokenExample(sampler.corpus.text_of(sampler.corpus.tokens[a:t + 1]), bool(routed[t]),
                                float(sampler.acts[t, unit]), int(sampler.corpus.tokens[t])))
    return out


def token_baseline(sampler: Sampler, unit: int, examples: list[TokenExample]) -> list[bool]:
    """Token identity as a predictor, fitted on the explaining half: "routed" when the share of that
    token's occurrences routed to the expert there exceeds the expert's overall share."""
    mask = np.zeros(len(sampler.corpus.tokens), dtype=bool)
    for w in np.flatnonzero(~sampler.scoring):
        a, b = sampler.win[w]
        mask[a:b] = True
    toks = sampler.corpus.tokens[mask]
    routed = sampler.acts[mask, unit] > 0
    base = routed.mean() if len(routed) else 0.0
    hits = np.bincount(toks, weights=routed, minlength=int(sampler.corpus.tokens.max()) + 1)
    seen = np.bincount(toks, minlength=len(hits))
    share = np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)
    return [bool(share[e.token_id] > base) if e.token_id < len(share) and seen[e.token_id] else False
            for e in examples]

