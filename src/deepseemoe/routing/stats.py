"""Routing statistics of a routing run: the measures of Mixtral §5 (repetition) and OLMoE §5
(specialization, saturation), defined exactly below (co-activation counts all pairs of a token's
top-k; OLMoE's analysis script counts rank-adjacent pairs only).

Shapes: per shard and MoE layer, experts [T, K] and weights [T, K] (rank order), token ids
[T], domain codes [T]; accumulated counts: load [L, E], pairs [L, E, E], domain [L, D, E],
vocabulary [L, V, E] (sparse, as bincounts), transitions [L-1, E, E].

One streaming pass over the shards accumulates integer counts; every statistic is derived
from the counts at the end, so memory is bounded by one shard and the time grows linearly
with tokens. Definitions (all over the K routing slots of each kept token unless stated):
  load            f_e = slots to e / (T·K); entropy H(f)/log E; CV = std(f)/mean(f); dead = f_e == 0
  weighted load   Σ weights to e / Σ weights
  class entropy   per token class c, H(p_c)/log E with p_c(e) = slots of class-c tokens to e
  co-activation   P(i,j) = share of tokens with both i and j in their top-k; lift = P(i,j)/(P(i)P(j));
                  P(j|i) = P(i,j)/P(i) (all C(K,2) pairs of a token's top-k). p_j_given_i_adjacent is the
                  variant of OLMoE's scripts/run_moe_analysis.py, which its co-activation heat maps
                  show: tokens where i and j sit at adjacent ranks (r, r+1; K−1 of the C(K,2) pairs) /
                  tokens with i in the top-k
  repetition      consecutive tokens of a document (pos, pos+1): top-1 equal; top-k sets intersect;
                  mean |S_t ∩ S_t+1|/K. Baselines: uniform (1/E; 1-C(E-K,K)/C(E,K); K/E) and
                  load-matched independent tokens (Σ p1(e)²; Σ f'(e)²/K with f'(e) = P(e ∈ S))
  vocabulary      share(v,e) = share of token v's occurrences with e in the top-k (input token v,
                  or next token v); specialization(v) = max_e share(v,e), over tokens seen ≥ min_count
                  (default 5; `stats --min-count`). The next token pairs within a document only
                  (OLMoE's script pairs across document ends, as its contexts run on)
  domain          share(d,e) = slots of domain d to e / slots of d (uniform routing: 1/E);
                  lift_over_uniform = share·E; token_share = share·K = share of d's tokens with e in
                  their top-k (OLMoE §5.3's domain specialization); top1_share = share of d's tokens
                  whose top-1 is e. NMI(domain; expert) over slots (perfect specialization reads at
                  most H(d)/(H(d)+H(e))·2 < 1 when K > 1) and over top-1 choices (domain_nmi_top1),
                  normalised by the arithmetic mean of the entropies
  transitions     top-1 expert at l → top-1 at the next MoE layer: counts, MI (bits), NMI
  saturation      (two runs, same tokens) mean |S_a ∩ S_b|/K and top-1 agreement per layer
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import comb
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.measures import entropy as _entropy
from deepseemoe.measures import mutual_information
from deepseemoe.runs.routing import RoutingRun

TOKEN_CLASSES = ("word_start", "word_piece", "digit", "punctuation", "whitespace", "other")


_BYTE_LEVEL_SPACES = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "})


def token_class(piece: str) -> int:
    """Class of a token piece (byte-level BPE writes space/newline/tab as Ġ/Ċ/ĉ, SentencePiece as ▁)."""
    text = piece.translate(_BYTE_LEVEL_SPACES)
    core = text.strip()
    if not core:
        return TOKEN_CLASSES.index("whitespace" if text else "other")
    if core.isdigit():
        return TOKEN_CLASSES.index("digit")
    if core.isalpha():
        return TOKEN_CLASSES.index("word_start" if text[0].isspace() else "word_piece")
    if not any(ch.isalnum() for ch in core):
        return TOKEN_CLASSES.index("punctuation")
    return TOKEN_CLASSES.index("other")


@dataclass
class _Counts:
    E: int
    K: int
    V: int
    D: int
    tokens: int = 0
    load: np.ndarray = None  # [E] slots
    wload: np.ndarray = None  # [E] weight sums
    top1: np.ndarray = None  # [E]
    present: np.ndarray = None  # [E] tokens with e in top-k (== load when experts are distinct)
    pairs: np.ndarray = None  # [E, E] tokens with both i and j (symmetric, diagonal = present)
    adjacent: np.ndarray = None  # [E, E] tokens with i and j at adjacent ranks (counted both ways)
    cls: np.ndarray = None  # [C, E]
    domain: np.ndarray = None  # [D, E] slots
    domain_top1: np.ndarray = None  # [D, E] tokens whose top-1 expert is e
    vocab: np.ndarray = None  # [V, E] occurrences with e in top-k
    vocab_n: np.ndarray = None  # [V]
    next_vocab: np.ndarray = None  # [V, E]
    next_n: np.ndarray = None  # [V]
    consecutive: int = 0
    rep_top1: int = 0
    rep_any: int = 0
    rep_overlap: int = 0

    def __post_init__(self):
        E, V = self.E, self.V
        self.load, self.wload, self.top1, self.present = (np.zeros(E, np.int64), np.zeros(E), np.zeros(E, np.int64),
                                                          np.zeros(E, np.int64))
        self.pairs = np.zeros((E, E), np.int64)
        self.adjacent = np.zeros((E, E), np.int64)
        self.cls = np.zeros((len(TOKEN_CLASSES), E), np.int64)
        self.domain = np.zeros((max(self.D, 1), E), np.int64)
        self.domain_top1 = np.zeros((max(self.D, 1), E), np.int64)
        self.vocab, self.vocab_n = np.zeros((V, E), np.int64), np.zeros(V, np.int64)
        self.next_vocab, self.next_n = np.zeros((V, E), np.int64), np.zeros(V, np.int64)


def _bincount2(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.bincount(rows.astype(np.int64) * shape[1] + cols, minlength=shape[0] * shape[1]).reshape(shape)


def _expert_sets(experts: np.ndarray, E: int) -> np.ndarray:
    """Each token's top-k set as a bit mask [T, ceil(E/64)] uint64 (a token's experts are distinct,
    so summing the bits is or-ing them)."""
    ids = np.arange(E)
    bit = np.left_shift(np.uint64(1), (ids % 64).astype(np.uint64))[experts]  # [T, K], a gather
    words = (E + 63) // 64
    if words == 1:
        return bit.sum(1, dtype=np.uint64)[:, None]
    word = (ids // 64)[experts]
    return np.stack([np.where(word == w, bit, np.uint64(0)).sum(1, dtype=np.uint64) for w in range(words)], 1)


def _accumulate(c: _Counts, experts: np.ndarray, weights: np.ndarray, token_ids: np.ndarray, cls: np.ndarray,
                domain: np.ndarray, consecutive: np.ndarray) -> None:
    """Add one shard of one layer: experts/weights [T, K], the rest [T]; consecutive [T-1] bool.
    Every count is an integer bincount, so shards (and layers, in threads) add up exactly."""
    T, K = experts.shape
    E = c.E
    flat = experts.reshape(-1).astype(np.int64)
    cols = np.ascontiguousarray(experts.T, dtype=np.int64)  # [K, T]: rank k's experts, contiguous
    c.tokens += T
    c.load += np.bincount(flat, minlength=E)
    c.wload += np.bincount(flat, weights=weights.reshape(-1), minlength=E)
    c.top1 += np.bincount(cols[0], minlength=E)
    c.present += np.bincount(flat, minlength=E)  # a token's top-k experts are distinct
    for i in range(K):  # pair counts over rank pairs (i < j); no dense [T, E] indicator: memory-bound here
        scaled = cols[i] * E
        for j in range(i + 1, K):
            counts = np.bincount(scaled + cols[j], minlength=E * E).reshape(E, E)
            c.pairs += counts
            if j == i + 1:
                c.adjacent += counts + counts.T
    group = domain * len(TOKEN_CLASSES) + cls
    by_group = np.bincount((group[:, None] * E + experts).reshape(-1),
                           minlength=c.domain.shape[0] * len(TOKEN_CLASSES) * E)
    by_group = by_group.reshape(c.domain.shape[0], len(TOKEN_CLASSES), E)
    c.domain += by_group.sum(1)
    c.domain_top1 += np.bincount(domain * E + cols[0], minlength=c.domain_top1.size).reshape(c.domain_top1.shape)
    c.cls += by_group.sum(0)
    c.vocab += np.bincount((token_ids[:, None] * E + experts).reshape(-1), minlength=c.V * E).reshape(c.V, E)
    c.vocab_n += np.bincount(token_ids, minlength=c.V)
    if T > 1:
        sets = _expert_sets(experts, E)
        _add_pairs(c, experts[:-1][consecutive], experts[1:][consecutive], token_ids[1:][consecutive],
                   sets[:-1][consecutive], sets[1:][consecutive])


def _add_pairs(c: _Counts, first: np.ndarray, second: np.ndarray, next_ids: np.ndarray, first_sets: np.ndarray,
               second_sets: np.ndarray) -> None:
    """Add n pairs of consecutive tokens of a document: the experts [n, K] of the earlier and of the
    later token, the later token's id [n] (the earlier one's next token), and both tokens' expert
    sets (`_expert_sets`)."""
    E = c.E
    c.next_vocab += np.bincount((next_ids[:, None] * E + first).reshape(-1).astype(np.int64),
                                minlength=c.V * E).reshape(c.V, E)
    c.next_n += np.bincount(next_ids, minlength=c.V)
    overlap = np.bitwise_count(first_sets & second_sets).sum(1, dtype=np.int64)
    c.consecutive += len(next_ids)
    c.rep_top1 += int((first[:, 0] == second[:, 0]).sum())
    c.rep_any += int((overlap > 0).sum())
    c.rep_overlap += int(overlap.sum())


def _shard_arrays(run: RoutingRun, part: str, domain_codes: dict[str | None, int], vocab_size: int):
    """Token-level arrays and per-layer (experts, weights) [T, K] of one shard."""
    import pyarrow.compute as pc

    tokens = run.read_table("tokens", part, ["doc", "pos", "token_id", "domain"])
    doc = tokens["doc"].to_numpy()
    pos = tokens["pos"].to_numpy()
    token_ids = tokens["token_id"].to_numpy().astype(np.int64)
    if token_ids.size and token_ids.max() >= vocab_size:
        raise DeepSeeMoEError(f"token id {token_ids.max()} is outside the vocabulary size {vocab_size}")
    dictionary = pc.dictionary_encode(tokens["domain"]).combine_chunks()
    codes = np.array([domain_codes.setdefault(d, len(domain_codes)) for d in dictionary.dictionary.to_pylist()]
                     + [domain_codes.setdefault(None, len(domain_codes))], dtype=np.int64)
    indices = dictionary.indices.to_numpy(zero_copy_only=False)
    domain = codes[np.where(np.isnan(indices.astype(float)), len(codes) - 1, np.nan_to_num(indices).astype(np.int64))]
    consecutive = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
    per_layer = run.routing_layers(part, len(doc))
    return doc, pos, token_ids, domain, consecutive, per_layer


def _keys(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """One int64 per token, (doc, pos) packed so that a token's successor in its document is key + 1."""
    return (doc.astype(np.int64) << 32) + pos.astype(np.int64)


def _is_start(pos: np.ndarray, consecutive: np.ndarray) -> np.ndarray:
    """[T] bool: the tokens with a predecessor in their document (pos > 0) that is not the row
    before them in the shard."""
    start = pos > 0
    start[1:] &= ~consecutive
    return start


@dataclass
class RoutingStats:
    """Every statistic of one routing run; `save_routing_stats` writes them as RUN_DIR/analyses/."""

    run: RoutingRun
    summary: dict
    tables: dict[str, object]  # name -> pandas DataFrame (columns: see the tables built below)
    domains: list[str]

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir


@dataclass
class _Survey:
    """What one cheap pass over the token tables finds before the counting pass: the vocabulary
    size, the text and symbol of every token id seen, the domains (sorted, None last) and the keys
    of every start (`_is_start`, sorted). Read shard by shard: memory grows with the vocabulary and
    the number of batches, not with the tokens."""

    vocab_size: int
    texts: dict[int, str]
    pieces: dict[int, str]
    domains: list[str | None]
    start_keys: np.ndarray


def _survey(run: RoutingRun) -> _Survey:
    texts: dict[int, str] = {}
    pieces: dict[int, str] = {}
    domains: set[str | None] = set()
    found = [np.zeros(0, np.int64)]
    largest = -1
    for part in run.parts:
        table = run.read_columns("tokens", part, ["doc", "pos", "token_id", "token", "piece", "domain"])
        doc, pos = table["doc"].to_numpy(), table["pos"].to_numpy()
        consecutive = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
        found.append(_keys(doc, pos)[_is_start(pos, consecutive)])
        ids = table["token_id"].to_numpy().astype(np.int64)
        uniq, first = np.unique(ids, return_index=True)
        new = np.array([int(t) not in texts for t in uniq], bool) if len(uniq) else np.zeros(0, bool)
        if new.any():
            rows = first[new]
            for t, text, piece in zip(uniq[new].tolist(), table["token"].take(rows).to_pylist(),
                                      table["piece"].take(rows).to_pylist(), strict=True):
                texts[t], pieces[t] = text or "", piece or ""
        if len(uniq):
            largest = max(largest, int(uniq[-1]))
        domains.update(table["domain"].unique().to_pylist())
    ordered = sorted(d for d in domains if d is not None) + ([None] if None in domains else [])
    return _Survey(largest + 1 if largest >= 0 else 1, texts, pieces, ordered, np.unique(np.concatenate(found)))


def compute_routing_stats(run_dir: str | Path, *, checkpoint: str | Path | None = None, min_count: int = 5,
                          top_tokens: int = 10, progress: bool = False, trust: bool = False) -> RoutingStats:
    """Compute every routing statistic of a run (nothing is written: see `save_routing_stats`);
    every file of the run is checked against its manifest first unless `trust`."""
    import pandas as pd

    run = RoutingRun.open(run_dir)
    if not trust:
        run.verify_all()
    survey = _survey(run)
    V, texts, pieces, domain_names = survey.vocab_size, survey.texts, survey.pieces, survey.domains
    cls_of = np.full(V, TOKEN_CLASSES.index("other"), np.int64)
    for t, p in pieces.items():
        cls_of[t] = token_class(p)
    domain_codes: dict[str | None, int] = {}
    for d in domain_names:  # domains are sized up front, so every shard shares one code table
        domain_codes.setdefault(d, len(domain_codes))
    counts = {layer: _Counts(run.num_experts[layer], run.top_k[layer], V, len(domain_codes)) for layer in run.layers}
    transitions = {(a, b): np.zeros((run.num_experts[a], run.num_experts[b]), np.int64)
                   for a, b in zip(run.layers, run.layers[1:], strict=False)}
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(run.layers), os.cpu_count() or 1)))
    from deepseemoe.progress import track

    # a document can run on from one shard into another (route cuts shards between batches), and under
    # torchrun a rank's shard holds every N-th batch, so consecutive tokens of a document can also sit
    # apart inside one shard: every token whose predecessor is not the row before it ("a start") is
    # kept, with the tokens whose successor is such a start ("an end"), and they are paired after the
    # pass — any sharding, any number of ranks, the same statistics. A pre-pass over (doc, pos) finds
    # the starts, so only the ends that will be paired are kept (about one per batch, not one per document).
    start_keys = survey.start_keys
    starts: dict[int, tuple[int, dict]] = {}  # key -> (token id, experts [1, K] per layer)
    ends: dict[int, dict] = {}  # key of the successor -> experts [1, K] per layer
    for part in track(run.parts, "routing statistics", disable=not progress, unit="shards"):
        doc, pos, token_ids, domain, consecutive, per_layer = _shard_arrays(run, part, domain_codes, V)
        keys = _keys(doc, pos)
        for i in np.nonzero(_is_start(pos, consecutive))[0]:
            # copies: a view would keep the whole shard's routing alive for the rest of the pass
            starts[int(keys[i])] = (int(token_ids[i]), {la: e[i:i + 1].copy() for la, (e, _) in per_layer.items()})
        last = np.ones(len(doc), bool)
        last[:-1] = ~consecutive
        for i in np.nonzero(last & np.isin(keys + 1, start_keys))[0]:
            ends[int(keys[i]) + 1] = {la: e[i:i + 1].copy() for la, (e, _) in per_layer.items()}
        cls = cls_of[token_ids]
        # numpy releases the GIL in bincount and friends: one thread per core over the layers
        shared = (token_ids, cls, domain, consecutive)
        list(pool.map(lambda item, shared=shared: _accumulate(counts[item[0]], *item[1], *shared),
                      per_layer.items()))
        for (a, b), table in transitions.items():
            table += _bincount2(per_layer[a][0][:, 0].astype(np.int64), per_layer[b][0][:, 0].astype(np.int64),
                                table.shape)
        # this shard's arrays go before the next shard is read: one shard in memory at a time
        del doc, pos, token_ids, domain, consecutive, per_layer, keys, cls, shared

    pool.shutdown()
    for key, earlier in ends.items():
        later = starts.get(key)
        if later is not None:
            for layer in run.layers:
                a, b = earlier[layer], later[1][layer]
                _add_pairs(counts[layer], a, b, np.array([later[0]], np.int64), _expert_sets(a, counts[layer].E),
                           _expert_sets(b, counts[layer].E))
    names = {code: name for name, code in domain_codes.items()}
    summary: dict = {"tokens": counts[run.layers[0]].tokens, "layers": {}, "notes": [],
                     "definitions": "see deepseemoe/routing/stats.py docstring"}
    rows_load, rows_co, rows_cls, rows_dom, rows_vocab, rows_tr = [], [], [], [], [], []
    for layer in run.layers:
        c = counts[layer]
        E, K, T = c.E, c.K, c.tokens
        f = c.load / max(T * K, 1)
        wl = c.wload / max(c.wload.sum(), 1e-300)
        p1 = c.top1 / max(T, 1)
        fp = c.present / max(T, 1)
        for e in range(E):
            rows_load.append((layer, e, f[e], wl[e], p1[e]))
        p_pair = (c.pairs + c.pairs.T) / max(T, 1)
        np.fill_diagonal(p_pair, fp)  # pairs were counted once per unordered pair: symmetrised above
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(np.outer(fp, fp) > 0, p_pair / np.outer(fp, fp), np.nan)
            cond = np.where(fp[:, None] > 0, p_pair / fp[:, None], np.nan)
            cond_adj = np.where(c.present[:, None] > 0, c.adjacent / c.present[:, None], np.nan)
        for i in range(E):
            for j in range(E):
                if i != j:
                    rows_co.append((layer, i, j, p_pair[i, j], lift[i, j], cond[i, j], cond_adj[i, j]))
        for k, name in enumerate(TOKEN_CLASSES):
            n = int(c.cls[k].sum())
            if n:
                rows_cls.append((layer, name, n // K, float(_entropy(c.cls[k].astype(float)) / np.log(E))))
        dom_share = c.domain / np.clip(c.domain.sum(1, keepdims=True), 1, None)
        dom_top1 = c.domain_top1 / np.clip(c.domain_top1.sum(1, keepdims=True), 1, None)
        for d in range(c.domain.shape[0]):
            if c.domain[d].sum():
                for e in range(E):
                    rows_dom.append((layer, names.get(d), e, dom_share[d, e], dom_share[d, e] * E,
                                     dom_share[d, e] * K, dom_top1[d, e]))
        seen = c.vocab_n >= min_count
        share = c.vocab[seen] / c.vocab_n[seen, None]
        nseen = c.next_n >= min_count
        nshare = c.next_vocab[nseen] / c.next_n[nseen, None]
        ids_seen = np.nonzero(seen)[0]
        for e in range(E):
            # highest share first, ties broken by frequency
            order = np.lexsort((-c.vocab_n[ids_seen], -share[:, e]))[:top_tokens] if len(ids_seen) else []
            order = [o for o in order if share[o, e] > 0]  # a token never routed to the expert is none of its tokens
            for rank, o in enumerate(order):
                t = int(ids_seen[o])
                rows_vocab.append((layer, e, rank, t, texts.get(t, ""), int(c.vocab_n[t]), float(share[o, e])))
        dom_mi, dom_nmi = mutual_information(c.domain[c.domain.sum(1) > 0])
        _, dom_nmi_top1 = mutual_information(c.domain_top1[c.domain_top1.sum(1) > 0])
        rep_n = max(c.consecutive, 1)
        summary["layers"][str(layer)] = {
            "experts": E, "top_k": K,
            "load_entropy": float(_entropy(f.astype(float)) / np.log(E)),
            "load_cv": float(f.std() / f.mean()) if f.mean() > 0 else 0.0,
            "dead_experts": int((c.load == 0).sum()),
            "max_load": float(f.max()),
            "repetition": {
                "pairs": c.consecutive,
                "top1_same": c.rep_top1 / rep_n, "top1_same_uniform": 1 / E, "top1_same_load_matched": float((p1 ** 2).sum()),
                "topk_any_overlap": c.rep_any / rep_n,
                "topk_any_overlap_uniform": 1 - comb(E - K, K) / comb(E, K) if E >= 2 * K else 1.0,
                "topk_overlap_frac": c.rep_overlap / rep_n / K, "topk_overlap_frac_uniform": K / E,
                "topk_overlap_frac_load_matched": float((fp ** 2).sum() / K),
            },
            "vocab_specialization_input": float(share.max(1).mean()) if share.size else None,
            "vocab_specialization_next": float(nshare.max(1).mean()) if nshare.size else None,
            "vocab_specialization_uniform": K / E,
            "domain_mi_bits": dom_mi, "domain_nmi": dom_nmi, "domain_nmi_top1": dom_nmi_top1,
        }
    for (a, b), table in transitions.items():
        mi, nmi = mutual_information(table)
        summary["layers"][str(a)]["transition_to_next"] = {"next_layer": b, "mi_bits": mi, "nmi": nmi}
        ii, jj = np.nonzero(table)
        rows_tr += [(a, b, int(i), int(j), int(table[i, j])) for i, j in zip(ii, jj, strict=True)]

    tables = {
        "load": pd.DataFrame(rows_load, columns=["layer", "expert", "load", "weighted_load", "top1_share"]),
        "coactivation": pd.DataFrame(rows_co, columns=["layer", "expert_i", "expert_j", "p_both", "lift",
                                                       "p_j_given_i", "p_j_given_i_adjacent"]),
        "class_entropy": pd.DataFrame(rows_cls, columns=["layer", "token_class", "tokens", "entropy_norm"]),
        "domain": pd.DataFrame(rows_dom, columns=["layer", "domain", "expert", "share", "lift_over_uniform",
                                                  "token_share", "top1_share"]),
        "vocab_top_tokens": pd.DataFrame(rows_vocab, columns=["layer", "expert", "rank", "token_id", "token", "count",
                                                              "share"]),
        "transitions": pd.DataFrame(rows_tr, columns=["layer", "next_layer", "expert", "next_expert", "count"]),
    }
    if checkpoint is not None:
        sat = router_saturation(checkpoint, run_dir)
        summary["saturation"] = sat
        tables["saturation"] = pd.DataFrame([{"layer": int(k), **v} for k, v in sat["layers"].items()])
    return RoutingStats(run, summary, tables, [names[i] for i in sorted(names)])


def save_routing_stats(stats: RoutingStats, figures: bool = True) -> Path:
    """RUN_DIR/analyses/: the tables, summary.json and (unless `figures` is off) the figures, saved
    whole by the run's own class with the run's digest as their input."""
    draw = None
    if figures:
        from deepseemoe.routing.figures import routing_figures

        def draw(folder: Path) -> None:
            routing_figures(stats.tables, stats.summary, folder)

    return stats.run.save_analyses(stats.tables, stats.summary, draw)


def _topk_sets(run: RoutingRun) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer: (keys [T] = doc·2^20 + pos, experts [T, K]) over all shards."""
    keys, per_layer = [], {layer: [] for layer in run.layers}
    for part in run.parts:
        tokens = run.read_table("tokens", part, ["doc", "pos"])
        keys.append(tokens["doc"].to_numpy().astype(np.int64) * (1 << 20) + tokens["pos"].to_numpy())
        for layer, (experts,) in run.routing_layers(part, tokens.num_rows, columns=("expert",)).items():
            per_layer[layer].append(experts)
    key = np.concatenate(keys)
    return {layer: (key, np.concatenate(chunks)) for layer, chunks in per_layer.items()}


def router_saturation(checkpoint_run: str | Path, final_run: str | Path) -> dict:
    """OLMoE §5.1: share of the final checkpoint's top-k experts already chosen at an earlier
    checkpoint, over the tokens (doc, pos) both runs routed. Random baseline K/E."""
    a, b = RoutingRun.open(checkpoint_run), RoutingRun.open(final_run)
    if a.layers != b.layers:
        raise DeepSeeMoEError(f"runs {a.run_dir} and {b.run_dir} have different MoE layers; compare checkpoints "
                              "of the same model")
    sa, sb = _topk_sets(a), _topk_sets(b)
    result = {"checkpoint_run": str(a.run_dir), "final_run": str(b.run_dir), "layers": {}}
    for layer in a.layers:
        ka, ea = sa[layer]
        kb, eb = sb[layer]
        common, ia, ib = np.intersect1d(ka, kb, assume_unique=False, return_indices=True)
        if not len(common):
            raise DeepSeeMoEError("the two runs share no tokens; route the same data with both checkpoints")
        xa, xb = ea[ia].astype(np.int64), eb[ib].astype(np.int64)
        E, K = b.num_experts[layer], b.top_k[layer]
        ha = np.zeros((len(common), E), bool)
        hb = np.zeros((len(common), E), bool)
        np.put_along_axis(ha, xa, True, 1)
        np.put_along_axis(hb, xb, True, 1)
        result["layers"][str(layer)] = {"tokens": len(common), "topk_saturation": float((ha & hb).sum(1).mean() / K),
                                        "top1_agreement": float((xa[:, 0] == xb[:, 0]).mean()),
                                        "random_baseline": K / E}
    return result
