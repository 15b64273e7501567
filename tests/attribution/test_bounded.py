"""Attribution graphs bounded before they are materialised (`build_graph(max_targets=M)`,
`attribute --max-nodes M`): the rows it computes are the whole graph's rows (the reference: the
unbounded graph, whose edges tests/attribution/test_graph.py checks against the model), restricted
to the kept nodes; the first batch chosen after the logits is the top of the logits' direct
influence, computed here by hand from the whole graph; each kept node's value is its kept inputs
plus its bias; and on the planted MoE a bound of 3 keeps the deciding path."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.attribution.graph import build_graph, prune
from tests.attribution.test_graph import _handle, _ids, _meta, _sae


def _key(n):
    return (n.kind, n.layer, n.pos, n.index)


def test_bounded_rows_are_the_whole_graphs_rows_and_the_first_batch_is_the_top_of_the_logits_influence():
    handle = _handle()
    sae = _sae(handle.model.config.hidden_size)
    dicts = {"s": (sae, _meta("sae", 1))}
    whole = build_graph(handle, _ids(), dicts, batch_size=8)
    targets = [i for i, n in enumerate(whole.nodes) if n.kind in ("feature", "router", "expert")]
    assert len(targets) > 24
    bounded = build_graph(handle, _ids(), dicts, batch_size=8, max_targets=8)
    assert bounded.summary["bounded"]["expanded"] == 8 + len(whole.of_kind("logit"))
    index = {_key(n): i for i, n in enumerate(whole.nodes)}
    kept = [index[_key(n)] for n in bounded.nodes]
    expanded = [i for i, n in enumerate(bounded.nodes) if n.kind in ("feature", "router", "expert", "logit")]
    assert len(expanded) == bounded.summary["bounded"]["expanded"]  # dropped targets leave the graph
    for i in expanded:  # the same direct effects, over the kept sources
        torch.testing.assert_close(bounded.adjacency[i], whole.adjacency[kept[i]][kept])
        assert float(bounded.adjacency[i].sum() + bounded.bias[i]) == pytest.approx(bounded.nodes[i].value, abs=1e-4)
    # by hand: the logits' direct influence on every node, each logit weighted by its probability
    a = whole.adjacency.abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-10)
    influence = sum(p * a[i] for i, p in whole.logit_probabilities.items())
    top = sorted(targets, key=lambda i: -float(influence[i]))[:8]
    assert {_key(whole.nodes[i]) for i in top} == {_key(bounded.nodes[i]) for i in expanded
                                                   if bounded.nodes[i].kind != "logit"}
    # pruning works on the bounded graph; a bound above the targets is the whole graph
    assert prune(bounded).summary["kept_influence"] > 0
    same = build_graph(handle, _ids(), dicts, batch_size=8, max_targets=len(targets) + 5)
    torch.testing.assert_close(same.adjacency, whole.adjacency)
    assert "bounded" not in same.summary


def test_a_bound_of_three_keeps_the_planted_path():
    from tests.attribution.test_known_answer import FILLER, A, _planted

    handle, dicts, _ = _planted()
    graph = prune(build_graph(handle, torch.tensor([FILLER, FILLER, A]), dicts, max_targets=3))
    kinds = {(n.kind, n.layer, n.pos, n.index) for i, n in enumerate(graph.nodes) if graph.node_mask[i]}
    assert {("feature", 0, 2, 0), ("router", 0, 2, 2), ("expert", 0, 2, 2)} <= kinds


def test_a_bound_below_one_is_refused():
    from deepseemoe.errors import DeepSeeMoEError

    handle = _handle()
    with pytest.raises(DeepSeeMoEError, match="at least 1"):
        build_graph(handle, _ids(), {}, max_targets=0)
