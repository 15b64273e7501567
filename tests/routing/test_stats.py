"""Routing statistics on hand-built routing records whose answers are computed by hand below."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deepseemoe.routing.stats import (
    compute_routing_stats,
    mutual_information,
    router_saturation,
    save_routing_stats,
    token_class,
)
from deepseemoe.runs.routing import RoutingRunWriter

# 4 tokens: doc 0 (pos 0,1; domain x) and doc 1 (pos 0,1; domain y); 2 MoE layers, E=4, K=2.
DOC = np.array([0, 0, 1, 1])
POS = np.array([0, 1, 0, 1])
IDS = np.array([5, 6, 5, 7])
PIECES = ["Ġa", "b", "Ġa", "1"]
DOMAINS = ["x", "x", "y", "y"]
L0 = np.array([[0, 1], [0, 2], [1, 3], [3, 1]])
W0 = np.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2]], dtype=np.float32)
L1 = np.array([[2, 3], [2, 3], [0, 1], [1, 0]])
W1 = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.7, 0.3]], dtype=np.float32)


def _run(path, l0=L0, l1=L1):
    with RoutingRunWriter(path, shard_tokens=2) as writer:  # two shards of 2 tokens each
        for sl in (slice(0, 2), slice(2, 4)):
            writer.add(DOC[sl], POS[sl], IDS[sl], PIECES[sl], DOMAINS[sl], {0: l0[sl], 1: l1[sl]},
                       {0: W0[sl], 1: W1[sl]})
        writer.commit({"moe_layers": {"0": {"num_experts": 4, "top_k": 2}, "1": {"num_experts": 4, "top_k": 2}}})
    return path


def _nmi_by_hand(counts) -> float:
    """2·MI / (H(row) + H(column)) of a joint count table, written out term by term."""
    joint = np.array(counts, dtype=float) / np.sum(counts)
    px, py = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(px, py)[nz])).sum()
    hx, hy = -(px[px > 0] * np.log(px[px > 0])).sum(), -(py[py > 0] * np.log(py[py > 0])).sum()
    return 2 * mi / (hx + hy)


@pytest.fixture()
def stats(tmp_path):
    stats = compute_routing_stats(_run(tmp_path / "run"), min_count=1)
    save_routing_stats(stats)
    return stats


def test_load(stats):
    load = stats.tables["load"].query("layer == 0").sort_values("expert")
    np.testing.assert_allclose(load["load"], [2 / 8, 3 / 8, 1 / 8, 2 / 8])
    np.testing.assert_allclose(load["top1_share"], [0.5, 0.25, 0, 0.25])
    # weighted load: e0 .6+.7, e1 .4+.5+.2, e2 .3, e3 .5+.8 over a total of 4
    np.testing.assert_allclose(load["weighted_load"], [1.3 / 4, 1.1 / 4, 0.3 / 4, 1.3 / 4], rtol=1e-6)
    s = stats.summary["layers"]["0"]
    f = np.array([2, 3, 1, 2]) / 8
    assert s["load_entropy"] == pytest.approx(-(f * np.log(f)).sum() / np.log(4))
    assert s["load_cv"] == pytest.approx(f.std() / f.mean())
    assert s["dead_experts"] == 0 and s["max_load"] == pytest.approx(0.375)


def test_repetition_and_baselines(stats):
    r = stats.summary["layers"]["0"]["repetition"]
    assert r["pairs"] == 2  # (doc0 pos0→1) and (doc1 pos0→1); the doc boundary is not a pair
    assert r["top1_same"] == 0.5  # 0→0 yes, 1→3 no
    assert r["topk_any_overlap"] == 1.0  # {0,1}∩{0,2} and {1,3}∩{3,1} both non-empty
    assert r["topk_overlap_frac"] == pytest.approx((1 + 2) / 2 / 2)
    assert r["top1_same_uniform"] == 0.25
    assert r["top1_same_load_matched"] == pytest.approx(0.5**2 + 0.25**2 + 0.25**2)
    assert r["topk_any_overlap_uniform"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert r["topk_overlap_frac_load_matched"] == pytest.approx((0.5**2 + 0.75**2 + 0.25**2 + 0.5**2) / 2)


def test_coactivation(stats):
    co = stats.tables["coactivation"].query("layer == 0").set_index(["expert_i", "expert_j"])
    assert co.loc[(0, 1), "p_both"] == pytest.approx(1 / 4)  # only token 0
    assert co.loc[(1, 3), "p_both"] == pytest.approx(2 / 4)  # tokens 2 and 3
    assert co.loc[(1, 3), "lift"] == pytest.approx(0.5 / (0.75 * 0.5))
    assert co.loc[(3, 1), "p_j_given_i"] == pytest.approx(1.0)  # every token with 3 also has 1
    assert co.loc[(0, 3), "p_both"] == 0


def test_domain_specialization(stats):
    dom = stats.tables["domain"].query("layer == 0").pivot(index="domain", columns="expert", values="share")
    np.testing.assert_allclose(dom.loc["x"], [0.5, 0.25, 0.25, 0])
    np.testing.assert_allclose(dom.loc["y"], [0, 0.5, 0, 0.5])
    # NMI by hand: joint slot counts [[2,1,1,0],[0,2,0,2]]
    assert stats.summary["layers"]["0"]["domain_nmi"] == pytest.approx(_nmi_by_hand([[2, 1, 1, 0], [0, 2, 0, 2]]))


def test_vocabulary_and_classes(stats):
    s = stats.summary["layers"]["0"]
    # token 5 occurs twice, both with expert 1 in the top-k → share 1; tokens 6 and 7 once → 1
    assert s["vocab_specialization_input"] == pytest.approx(1.0)
    top = stats.tables["vocab_top_tokens"].query("layer == 0 and expert == 1 and rank == 0").iloc[0]
    assert top["token_id"] == 5 and top["share"] == 1.0 and top["count"] == 2
    # next tokens: t0 → 6 (experts {0,1}), t2 → 7 ({1,3}); each seen once → share 1
    assert s["vocab_specialization_next"] == pytest.approx(1.0)
    assert [token_class(p) for p in ("Ġthe", "ing", "42", ",", "Ċ", "a1")] == [0, 1, 2, 3, 4, 5]
    cls = stats.tables["class_entropy"].query("layer == 0").set_index("token_class")
    assert cls.loc["digit", "tokens"] == 1
    assert cls.loc["digit", "entropy_norm"] == pytest.approx(np.log(2) / np.log(4))  # experts {3,1}, one slot each


def test_transitions(stats):
    tr = stats.tables["transitions"].query("layer == 0")
    pairs = {(r.expert, r.next_expert): r["count"] for _, r in tr.iterrows()}
    assert pairs == {(0, 2): 2, (1, 0): 1, (3, 1): 1}
    mi, nmi = mutual_information(np.array([[2, 0, 0], [0, 1, 0], [0, 0, 1]]))
    assert mi == pytest.approx(1.5)  # H of (1/2, 1/4, 1/4) in bits, the mapping is a bijection
    assert stats.summary["layers"]["0"]["transition_to_next"]["mi_bits"] == pytest.approx(1.5)
    assert nmi == pytest.approx(1.0)


def test_saturation(tmp_path):
    final = _run(tmp_path / "final")
    early_l0 = np.array([[0, 2], [3, 2], [1, 3], [0, 2]])  # overlaps with final: 1, 1, 2, 0
    early = _run(tmp_path / "early", l0=early_l0)
    sat = router_saturation(early, final)["layers"]
    assert sat["0"]["topk_saturation"] == pytest.approx((1 + 1 + 2 + 0) / 4 / 2)
    assert sat["0"]["top1_agreement"] == pytest.approx(2 / 4)  # tokens 0 and 2
    assert sat["1"]["topk_saturation"] == 1.0 and sat["0"]["random_baseline"] == 0.5


def test_outputs_written(stats):
    out = stats.run_dir / "analyses"
    for name in ("summary.json", "load.parquet", "coactivation.parquet", "domain.parquet", "load.png",
                 "coactivation.png", "domain.png", "repetition.png", "transitions.png"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("E", [8, 64, 65, 200])
def test_expert_set_masks_count_overlaps_like_python_sets(E):
    # independent reference: Python set intersection, token by token
    from deepseemoe.routing.stats import _expert_sets

    rng = np.random.default_rng(E)
    experts = np.stack([rng.choice(E, 4, replace=False) for _ in range(300)]).astype(np.int16)
    sets = _expert_sets(experts, E)
    overlap = np.bitwise_count(sets[:-1] & sets[1:]).sum(1)
    expected = [len(set(a.tolist()) & set(b.tolist())) for a, b in itertools.pairwise(experts)]
    assert overlap.tolist() == expected


def test_domain_lift_token_share_and_top1(stats):
    # by hand from L0: domain x tokens {0,1},{0,2} (top-1 0, 0); domain y {1,3},{3,1} (top-1 1, 3); E=4, K=2
    dom = stats.tables["domain"].query("layer == 0").set_index(["domain", "expert"])
    # slot shares x: [.5, .25, .25, 0] → lift over the uniform 1/4: [2, 1, 1, 0]
    np.testing.assert_allclose([dom.loc[("x", e), "lift_over_uniform"] for e in range(4)], [2, 1, 1, 0])
    # under uniform routing every expert has lift 1, whatever K: y's [0, .5, 0, .5] → [0, 2, 0, 2]
    np.testing.assert_allclose([dom.loc[("y", e), "lift_over_uniform"] for e in range(4)], [0, 2, 0, 2])
    np.testing.assert_allclose([dom.loc[("x", e), "token_share"] for e in range(4)], [1, 0.5, 0.5, 0])
    np.testing.assert_allclose([dom.loc[("x", e), "top1_share"] for e in range(4)], [1, 0, 0, 0])
    np.testing.assert_allclose([dom.loc[("y", e), "top1_share"] for e in range(4)], [0, 0.5, 0, 0.5])
    top1 = [[2, 0, 0, 0], [0, 1, 0, 1]]  # top-1 choices by domain
    assert stats.summary["layers"]["0"]["domain_nmi_top1"] == pytest.approx(_nmi_by_hand(top1))


def test_olmoe_adjacent_rank_coactivation(tmp_path):
    # K=3, two tokens ranked [0, 1, 2] and [2, 0, 1]: every pair co-occurs in both tokens (all-pairs
    # P(j|i) = 1), but OLMoE's script counts rank neighbours only: (0,1),(1,2) and (2,0),(0,1)
    path = tmp_path / "run"
    e = np.array([[0, 1, 2], [2, 0, 1]])
    w = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], dtype=np.float32)
    with RoutingRunWriter(path) as writer:
        writer.add(np.array([0, 0]), np.array([0, 1]), np.array([5, 6]), ["a", "b"], ["x", "x"], {0: e}, {0: w})
        writer.commit({"moe_layers": {"0": {"num_experts": 4, "top_k": 3}}})
    co = compute_routing_stats(path, min_count=1).tables["coactivation"].set_index(["expert_i", "expert_j"])
    assert co.loc[(0, 1), "p_j_given_i"] == co.loc[(0, 2), "p_j_given_i"] == 1.0
    # by hand: adjacent (0,1) twice, (1,2) once, (0,2) once; each expert is in the top-k of 2 tokens
    assert co.loc[(0, 1), "p_j_given_i_adjacent"] == co.loc[(1, 0), "p_j_given_i_adjacent"] == 1.0
    assert co.loc[(1, 2), "p_j_given_i_adjacent"] == co.loc[(0, 2), "p_j_given_i_adjacent"] == 0.5
    assert co.loc[(2, 0), "p_j_given_i_adjacent"] == 0.5


def _written(path, cuts, order=None, **writer):
    """The module's 4 tokens written in batches cut at `cuts` (one shard per batch), the batches in
    `order` (default: as read)."""
    bounds = list(zip([0, *cuts], [*cuts, 4], strict=True))
    with RoutingRunWriter(path, **(writer or {"shard_tokens": 1})) as writer:
        for i in order or range(len(bounds)):
            sl = slice(*bounds[i])
            writer.add(DOC[sl], POS[sl], IDS[sl], PIECES[sl], DOMAINS[sl], {0: L0[sl], 1: L1[sl]},
                       {0: W0[sl], 1: W1[sl]})
        writer.commit({"moe_layers": {"0": {"num_experts": 4, "top_k": 2}, "1": {"num_experts": 4, "top_k": 2}}})
    return path


@pytest.mark.parametrize(("cuts", "order"), [([1, 3], None), ([1, 2, 3], None), ([1, 2, 3], [3, 1, 2, 0])])
def test_statistics_do_not_depend_on_the_sharding(tmp_path, stats, cuts, order):
    """Shard boundaries inside a document (and shards in another order, as ranks write them) keep
    every consecutive pair: the statistics equal those of the run whose shards hold whole documents."""
    other = compute_routing_stats(_written(tmp_path / "cut", cuts, order), min_count=1)
    assert other.summary["layers"]["0"]["repetition"]["pairs"] == 2  # by hand, as in the whole-document run
    assert other.summary["layers"]["0"]["repetition"]["top1_same"] == 0.5
    assert other.summary["layers"] == stats.summary["layers"]
    for name, table in stats.tables.items():
        mine = other.tables[name]
        keys = [c for c in table.columns if table[c].dtype == object or c in ("layer", "expert", "token_id")]
        a = table.sort_values(keys).reset_index(drop=True) if keys else table
        b = mine.sort_values(keys).reset_index(drop=True) if keys else mine
        import pandas as pd

        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)


def test_statistics_of_shards_that_hold_every_other_batch(tmp_path, stats):
    """What a rank writes under torchrun: one shard holds batches 0 and 2, the other 1 and 3, so the
    consecutive tokens of a document sit apart inside a shard, not only across shard ends."""
    other = compute_routing_stats(_written(tmp_path / "ranks", [1, 2, 3], [0, 2, 1, 3], shard_tokens=2), min_count=1)
    assert other.summary["layers"]["0"]["repetition"]["pairs"] == 2  # by hand: (doc 0, 0→1) and (doc 1, 0→1)
    assert other.summary["layers"] == stats.summary["layers"]


def test_a_full_buffer_closes_the_shard_early(tmp_path, stats):
    """--buffer-gb: the writer closes a shard when its buffer is full, before --shard-tokens, and the
    statistics are those of the whole-document shards."""
    from deepseemoe.runs.routing import RoutingRun

    path = _written(tmp_path / "small", [1, 3], shard_tokens=10**6, buffer_gb=1e-9)
    assert len(RoutingRun.open(path).parts) == 3  # one shard per batch: each batch fills the buffer
    assert compute_routing_stats(path, min_count=1).summary["layers"] == stats.summary["layers"]
    one = _written(tmp_path / "one", [1, 3], shard_tokens=10**6)
    assert len(RoutingRun.open(one).parts) == 1


def test_memory_does_not_grow_with_the_shards(tmp_path):
    """One shard in memory at a time: the pass keeps a copy of each shard's first and last token,
    not a view that holds the shard's whole routing (it did, 256 MB a shard at OLMoE's shape).
    Peak traced memory over 16 shards stays near that over 2 (numpy reports to tracemalloc)."""
    import tracemalloc

    T, L, K, E = 20_000, 4, 8, 64
    rng = np.random.default_rng(0)
    experts = {la: np.argsort(rng.random((T, E)), axis=1)[:, :K] for la in range(L)}
    weights = {la: rng.random((T, K)).astype(np.float32) for la in range(L)}
    meta = {"moe_layers": {str(la): {"num_experts": E, "top_k": K} for la in range(L)}}
    peaks = {}
    for shards in (2, 16):
        path = tmp_path / f"run{shards}"
        with RoutingRunWriter(path, shard_tokens=T) as writer:
            for s in range(shards):  # documents of 700 tokens run across every shard boundary
                n = np.arange(s * T, (s + 1) * T)
                writer.add(n // 700, n % 700, n % 50, ["t"] * T, ["x"] * T, experts, weights)
            writer.commit(meta)
        tracemalloc.start()
        compute_routing_stats(path)
        peaks[shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[16] < 1.3 * peaks[2], peaks
