"""Domain specialisation against the domain-permutation null, on hand-built routing runs whose
answers are planted: every value below is worked out by hand from the planted routing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepseemoe.compare.specialists import expert_specialists, model_specialists, specialists_markdown
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.routing.stats import compute_routing_stats, save_routing_stats
from deepseemoe.runs.routing import RoutingRunWriter

TOKENS_PER_DOC = 10


def _run(path, top1_of_doc, domains, stats: bool = True):
    """One doc per entry of `top1_of_doc` (an int: every token's top-1 expert; a list: per token),
    10 tokens each, E = 4, K = 2 (the second choice is the next expert up)."""
    with RoutingRunWriter(path) as writer:
        for doc, (top1, domain) in enumerate(zip(top1_of_doc, domains, strict=True)):
            first = np.array(top1 if isinstance(top1, list) else [top1] * TOKENS_PER_DOC)
            experts = np.stack([first, (first + 1) % 4], 1)
            weights = np.tile(np.array([[0.7, 0.3]], np.float32), (TOKENS_PER_DOC, 1))
            writer.add(np.full(TOKENS_PER_DOC, doc), np.arange(TOKENS_PER_DOC), np.full(TOKENS_PER_DOC, 5 + doc % 3),
                       ["a"] * TOKENS_PER_DOC, [domain] * TOKENS_PER_DOC, {0: experts}, {0: weights})
        writer.commit({"moe_layers": {"0": {"num_experts": 4, "top_k": 2}}})
    if stats:
        save_routing_stats(compute_routing_stats(path, min_count=1))
    return path


def _nmi(table) -> float:
    p = np.array(table, float) / np.sum(table)
    px, py = p.sum(1), p.sum(0)
    mi = sum(p[i, j] * math.log(p[i, j] / (px[i] * py[j])) for i in range(len(px)) for j in range(len(py)) if p[i, j])
    h = -sum(x * math.log(x) for x in px if x) - sum(x * math.log(x) for x in py if x)
    return 2 * mi / h


def test_perfect_specialists_against_the_exact_permutation_null(tmp_path):
    # 4 documents of domain x all routed (top-1) to expert 0, 4 of domain y to expert 1
    run = _run(tmp_path / "run", [0] * 4 + [1] * 4, ["x"] * 4 + ["y"] * 4)
    m = model_specialists(run, "planted", shuffles=3000, seed=1)
    layer = m.layers[0]
    assert layer.nmi == pytest.approx(1.0)
    # the null: a permutation puts j of the 4 expert-0 documents under x, j ~ hypergeometric(8, 4, 4):
    # j = 0 or 4 → NMI 1 (2 of 70 permutations), j = 1 or 3 → the table [[10, 30], [30, 10]] (32 of 70), j = 2 → 0
    exact = (2 * 1.0 + 32 * _nmi([[10, 30], [30, 10]])) / 70
    assert layer.nmi_null_mean == pytest.approx(exact, abs=0.01)
    # both experts take their domain's tokens only: P(d | e) / P(d) = 1 / 0.5 = 2 ≥ 2, on 40 ≥ 20 tokens
    assert layer.specialists == 2
    by_expert = {p.expert: p for p in layer.profiles}
    assert (by_expert[0].domain, by_expert[0].lift, by_expert[0].domain_tokens) == ("x", 2.0, 40)
    assert (by_expert[1].domain, by_expert[1].lift, by_expert[1].top1_share) == ("y", 2.0, 0.5)
    assert not by_expert[2].specialist and by_expert[2].top1_share == 0
    assert layer.best_share["x"]["expert"] == 0 and layer.best_share["x"]["share"] == 1.0
    assert m.tokens == 80 and m.documents == 8 and m.top_k == 2


def test_routing_unrelated_to_domain_reads_zero(tmp_path):
    # every document spreads its tokens over experts 0..3 in the same proportions: the table is flat
    cycle = [i % 4 for i in range(8)] + [0, 1]
    run = _run(tmp_path / "run", [cycle] * 6, ["x", "y", "z"] * 2)
    layer = model_specialists(run, "flat", shuffles=20).layers[0]
    assert layer.nmi == pytest.approx(0.0, abs=1e-12) and layer.nmi_null_mean == pytest.approx(0.0, abs=1e-12)
    assert layer.specialists == 0 and layer.specialists_null_mean == 0


def test_table_and_refusals(tmp_path):
    a = _run(tmp_path / "a", [0] * 4 + [1] * 4, ["x"] * 4 + ["y"] * 4)
    result = expert_specialists({"a": a, "b": a}, shuffles=10).to_json()
    assert list(result["models"]) == ["a", "b"] and result["settings"]["shuffles"] == 10
    md = specialists_markdown(result)
    assert "| a | 1 | 2 of 4 | 1.000 |" in md
    with pytest.raises(DeepSeeMoEError, match="deepseemoe stats"):
        model_specialists(_run(tmp_path / "nostats", [0, 1], ["x", "y"], stats=False), "n")
    with pytest.raises(DeepSeeMoEError, match="at least two domains"):
        model_specialists(_run(tmp_path / "one", [0, 1], ["x", "x"]), "one")
    with pytest.raises(DeepSeeMoEError, match="no routing runs"):
        expert_specialists({})
