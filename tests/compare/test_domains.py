"""Routing by domain and domain removal (`compare.domains`) on a planted model: `a`
tokens go to expert 0 only, `b` tokens to expert 1 only (top-1), attention writes nothing."""

from __future__ import annotations

import math

import numpy as np

from deepseemoe.compare.domains import (
    domain_removal,
    own_experts,
    removal_size,
    routing_counts,
    routing_summary,
)
from deepseemoe.compare.selectivity import domain_classes
from tests.causal.planted import planted_batch, planted_model


def test_planted_routing_by_domain_and_removal():
    handle = planted_model(top_k=1, num_experts=4, b_expert=1)
    batch = planted_batch()
    domains, class_of = domain_classes([batch])
    assert domains == ["a", "b"]
    counts = routing_counts(handle, [batch], class_of, len(domains))
    ids = batch.input_ids.reshape(-1)[batch.keep]
    n_a, n_b = int(((ids >= 10) & (ids < 20)).sum()), int(((ids >= 20) & (ids < 30)).sum())
    for c in counts.values():  # every kept token by hand: a → 0, b → 1
        np.testing.assert_array_equal(c["slots"], [[n_a, 0, 0, 0], [0, n_b, 0, 0]])
        np.testing.assert_array_equal(c["top1"], c["slots"])
    assert removal_size(4, 1 / 3) == 1 and removal_size(16, 1 / 7) == 2 and removal_size(7, 1 / 7) == 1
    own = own_experts(counts, 1)
    assert all(o.tolist() == [[0], [1]] for o in own.values())
    summary = routing_summary(counts, own, domains, declared=["a", "b", "x", "y"])["mean"]
    p = np.array([n_a, n_b]) / (n_a + n_b)
    assert summary["nmi_all_slots"] == summary["nmi_top1"] == 1.0
    assert summary["own_share_mean"] == summary["declared_share_mean"] == summary["own_is_declared"] == 1.0
    assert math.isclose(summary["load_entropy"], float(-(p * np.log(p)).sum() / np.log(4)), rel_tol=1e-9)
    assert math.isclose(summary["top_set_share"], max(n_a, n_b) / (n_a + n_b))
    assert summary["max_load"] == p.max()

    removal = domain_removal(handle, [batch], domains, own, declared=["a", "b", "x", "y"], draws=2)
    rows = {(r["domain"], r["removed"]): r for r in removal["rows"] if r["removed"] != "random"}
    # removing a domain's only expert hits it, and leaves the other domain exactly unchanged
    for d in ("a", "b"):
        for kind in ("own", "declared"):
            assert rows[(d, kind)]["target"] != 0 and rows[(d, kind)]["others"] == 0.0
    assert removal["experts_removed_per_layer"] == 1
    assert len([r for r in removal["rows"] if r["removed"] == "random"]) == 4
    assert removal["summary"]["own"]["n"] == 2


def test_own_share_counts_tokens_not_slots():
    """Top-2: every `a` token has expert 0 among its two, so with two own experts (0 and a second
    one that some a tokens also hold) the share of a tokens routed to their own experts is exactly 1."""
    handle = planted_model(top_k=2, num_experts=4, b_expert=1)
    batch = planted_batch()
    domains, class_of = domain_classes([batch])
    counts = routing_counts(handle, [batch], class_of, len(domains))
    own = own_experts(counts, 2)
    for layer, o in own.items():
        assert o[0, 0] == 0 and counts[layer]["slots"][0, o[0, 1]] > 0  # a second own expert some a tokens hold
    summary = routing_summary(counts, own, domains)
    for row in summary["per_layer"].values():
        assert row["own_share"]["a"] == 1.0 and row["own_share"]["b"] == 1.0
        assert row["top_k"] == 2.0


def test_descriptions_naming_the_domain_by_hand():
    from deepseemoe.compare.domains import descriptions_naming

    got = descriptions_naming(
        {1: "German words and verbs", 2: "Python functions", 3: "ISO codes in JSON", 4: "barcode digits", 5: "x"},
        {1: "de", 2: "code", 3: "code", 4: "code", 6: "ru"},
        {"de": ("german",), "code": ("code", "python")})
    # 1: "german"; 2: "python"; 3: "codes" is not the word "code"; 4: "barcode" neither; 6 has no description
    assert [(r["expert"], r["named"], r["words"]) for r in got["per_expert"]] == \
        [(1, True, ["german"]), (2, True, ["python"]), (3, False, []), (4, False, [])]
    assert got["experts"] == 4 and got["named"] == 2 and got["share"] == 0.5
