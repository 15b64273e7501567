"""A hand-set one-layer MoE with a planted answer: one SAE feature alone decides that token A goes to
expert 2, and expert 2 alone writes the logit of A's next word. The pruned graph of an A prompt is that
path (token → feature → router(2) → expert 2 → logit); for a B prompt, expert 2 is nowhere in it.

Every expected number is computed by hand from the planted weights."""

from __future__ import annotations

import math

import pytest
import torch

from deepseemoe.attribution.export import graph_json, strongest_route
from deepseemoe.attribution.graph import build_graph, prune
from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.tiny import tiny_model

A, B, FILLER = 5, 9, 3
A_NEXT, B_NEXT, FILLER_NEXT = 7, 8, 11
D = 8


def _planted():
    model = tiny_model("mixtral", num_hidden_layers=1, hidden_size=D, intermediate_size=4, num_local_experts=4,
                       num_experts_per_tok=1, vocab_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    unit = torch.eye(D)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # attention writes nothing (o_proj = 0): positions cannot talk to each other
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                     model.model.norm):
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:] = unit[2]  # every other token reads as filler
        emb[A], emb[B] = unit[0], unit[1]
        moe = model.model.layers[0].mlp
        moe.gate.weight[2] = 4 * unit[0]  # A → expert 2
        moe.gate.weight[1] = 4 * unit[1]  # B → expert 1
        moe.gate.weight[0] = 4 * unit[2]  # filler → expert 0
        ex = moe.experts  # gate_up_proj [E, 2F, D] (gate rows 0..3, up rows 4..7), down_proj [E, D, F]
        for expert, reads, writes in ((2, 0, 3), (1, 1, 4), (0, 2, 5)):
            ex.gate_up_proj[expert, 0] = unit[reads]
            ex.gate_up_proj[expert, 4] = unit[reads]
            ex.down_proj[expert, writes, 0] = 1.0
        head = model.lm_head.weight
        head[A_NEXT], head[B_NEXT], head[FILLER_NEXT] = 3 * unit[3], 3 * unit[4], 3 * unit[5]
    sae = build_coder(CoderConfig(d_in=D, n_latents=4, activation="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(unit[:, :4])  # feature j reads direction j
        sae.b_enc.zero_()
        sae.W_dec.copy_(unit[:4])
        sae.b_dec.zero_()
    meta = {"kind": "sae", "source": [["block_in", 0]], "target": [["block_in", 0]]}
    return handle_from_model(model.eval()), {"planted": (sae.eval(), meta)}, model.config.rms_norm_eps


def _kept(graph, kind):
    return [graph.nodes[i] for i in graph.of_kind(kind) if graph.node_mask[i]]


def _key(n):
    return (n.layer, n.pos, n.index)


def test_an_A_prompt_is_explained_by_the_planted_path():
    handle, dicts, eps = _planted()
    ids = torch.tensor([FILLER, FILLER, A])
    graph = prune(build_graph(handle, ids, dicts))
    last = 2
    # by hand: x = RMSNorm(e0) = e0/√(1/8 + eps); feature 0 = x·e0; router logit of expert 2 = 4·a0
    a0 = 1 / math.sqrt(1 / D + eps)
    h0 = a0 * a0 / (1 + math.exp(-a0))  # silu(gate)·up with gate = up = a0: what expert 2 writes along e3
    assert graph.nodes[graph.target].index == A_NEXT
    assert [_key(n) for n in _kept(graph, "feature")] == [(0, last, 0)]
    assert [_key(n) for n in _kept(graph, "router")] == [(0, last, 2)]
    assert [_key(n) for n in _kept(graph, "expert")] == [(0, last, 2)]
    feature = next(i for i in graph.of_kind("feature") if _key(graph.nodes[i]) == (0, last, 0))
    router = next(i for i in graph.of_kind("router") if _key(graph.nodes[i]) == (0, last, 2))
    expert = next(i for i in graph.of_kind("expert") if _key(graph.nodes[i]) == (0, last, 2))
    token = next(i for i in graph.of_kind("token") if graph.nodes[i].pos == last)
    assert graph.nodes[feature].value == pytest.approx(a0, rel=1e-5)
    assert float(graph.adjacency[router, feature]) == pytest.approx(4 * a0, rel=1e-5)
    assert graph.nodes[expert].value == pytest.approx(h0, rel=1e-4)
    assert graph.nodes[router].extra["weight"] == pytest.approx(1.0)
    assert graph.nodes[router].extra["margin"] == pytest.approx(4 * a0, rel=1e-5)  # every other logit is 0
    # the feature alone decides the route: the router's only input
    inputs = graph.adjacency[router].nonzero().squeeze(1).tolist()
    assert inputs == [feature]
    # the path, every link kept: token → feature → router → (gate) expert → target logit
    for t, s in ((feature, token), (router, feature), (expert, router), (graph.target, expert)):
        assert graph.edge_mask[t, s], (graph.nodes[s].kind, graph.nodes[t].kind)
    # expert → logit by hand: final norm of r = e0 + h0·e3, demeaned unembedding row of A_NEXT
    scale = 1 / math.sqrt((1 + h0 * h0) / D + eps)
    mean_row_e3 = 3 / 16  # the mean over the vocabulary of the e3 components of the unembedding
    assert float(graph.adjacency[graph.target, expert]) == pytest.approx((3 - mean_row_e3) * scale * h0, rel=1e-4)
    route = strongest_route(graph)
    assert (route["expert"], route["pos"], route["decided_by"]["kind"], route["decided_by"]["index"]) == (2, last, "feature", 0)
    # and the circuit-tracer file carries the same path
    doc = graph_json(graph, slug="a", scan="planted", prompt="A", num_layers=1)
    links = {(link["source"], link["target"]) for link in doc["links"]}
    assert {("E_5_2", "0_0_2"), ("0_0_2", "R0_2_2"), ("R0_2_2", "X0_2_2"), ("X0_2_2", "2_7_2")} <= links


def test_a_B_prompt_does_not_go_through_expert_2():
    handle, dicts, _ = _planted()
    graph = prune(build_graph(handle, torch.tensor([FILLER, FILLER, B]), dicts))
    assert graph.nodes[graph.target].index == B_NEXT
    assert all(n.index != 2 for n in graph.nodes if n.kind in ("router", "expert"))
    assert [_key(n) for n in _kept(graph, "router")] == [(0, 2, 1)]
    assert [_key(n) for n in _kept(graph, "feature")] == [(0, 2, 1)]


def test_zeroing_the_deciding_feature_reroutes_the_token_and_the_linear_prediction_is_exact_here():
    """Routing free. Here token A also carries e6, which only expert 3's router row reads (weight 1, and
    expert 3 writes nothing): A still goes to expert 2 (logit 4a against a). Removing feature 0 at the A
    position leaves a·e6 in the block input, so A goes to expert 3: its one routing decision changes,
    the fillers' do not. Expert 2's output is then gone from the model; in the linearised model (its
    gate and weight held) up(a·e6) = 0 removes it too, so both predict the target's demeaned logit falls
    by (3 − 3/16)·c·h, h = silu(a)·a what expert 2 wrote, c the final norm's scale at the prompt."""
    from deepseemoe.attribution.perturb import routing_perturbation

    handle, dicts, eps = _planted()
    with torch.no_grad():
        handle.model.model.embed_tokens.weight[A, 6] = 1.0
        handle.model.model.layers[0].mlp.gate.weight[3, 6] = 1.0
    graph = prune(build_graph(handle, torch.tensor([FILLER, FILLER, A]), dicts))
    got = routing_perturbation(handle, graph, dicts)
    a = 1 / math.sqrt(2 / D + eps)
    h = a * a / (1 + math.exp(-a))
    c = 1 / math.sqrt((2 + h * h) / D + eps)
    row = next(r for r in got["features"] if (r["pos"], r["feature"]) == (2, 0))
    assert row["activation"] == pytest.approx(a, rel=1e-5)
    assert row["linear"] == pytest.approx(-(3 - 3 / 16) * c * h, rel=1e-4)
    assert row["actual"] == pytest.approx(-(3 - 3 / 16) * c * h, rel=1e-4)
    assert (row["routing_changed"], row["routing_decisions"], row["own_decision_changed"]) == (1, 3, True)
    assert got["features_changing_routing"] >= 1 and got["median_abs_error_routing_changed"] == pytest.approx(0, abs=1e-4)
