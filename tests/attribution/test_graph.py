"""The attribution graph's edges against the model itself.

Independent references: Hugging Face's own forward (logits, router logits, the experts module's
outputs, the block input the SAE reads), edits made through the ordinary steering hook in a plain
forward, and hand computations (the final norm's scale read from the model's own norm module)."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.attribution.graph import build_graph, prune
from deepseemoe.capture.consumers import ActivationCollector
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.interventions.sites import rewrite_site
from deepseemoe.models.experts import recall_expert_outputs
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.tiny import tiny_model


def _handle(model_type: str = "olmoe"):
    return handle_from_model(tiny_model(model_type).eval())


def _sae(d: int, seed: int = 0, transcoder: bool = False, skip: bool = False):
    torch.manual_seed(seed)
    coder = build_coder(CoderConfig(d_in=d, d_out=d if transcoder else None, n_latents=40, activation="topk", k=5,
                                    skip=skip))
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.3)
        coder.input_scale.uniform_(0.5, 2.0)  # folded by the graph: the test reads the unfolded coder
        coder.target_scale.copy_(coder.input_scale) if not transcoder else coder.target_scale.uniform_(0.5, 1.5)
    return coder.eval()


def _meta(kind: str, layer: int) -> dict:
    if kind == "sae":
        return {"kind": "sae", "source": [["block_in", layer]], "target": [["block_in", layer]]}
    return {"kind": kind, "source": [["block_in", layer]], "target": [["block_out", layer]]}


def _hf(handle, ids):
    """What the model computes, read from its own modules: demeaned last logits, router logits and
    block inputs per layer, and each chosen expert's weighted output [S, K, D]."""
    sites = [Site(k, la) for la in handle.moe_layers for k in ("router_logits", "block_in", "routing")]
    col = ActivationCollector(sites)
    batch = run_capture(handle, ids[None], [col], exclude_bos=False, stop_early=False)
    logits = handle.model(ids[None]).logits[0, -1].detach()
    out = {"logit": logits - logits.mean(), "router": {}, "x": {}, "experts": {}, "idx": {}}
    for la, moe in handle.moe_layers.items():
        out["router"][la] = col.tensor(Site("router_logits", la))
        out["x"][la] = col.tensor(Site("block_in", la))
        idx, w = col.tensor(Site("routing", la)), batch.routing_weights[la]
        y = recall_expert_outputs(moe.experts, out["x"][la], idx)
        out["experts"][la] = y * w[..., None]
        out["idx"][la] = idx
    return out


def _ids():
    return torch.tensor([1, 17, 42, 5, 99, 23, 61, 8, 77])


def _rows(graph, kind):
    idx = graph.of_kind(kind)
    return idx, graph.adjacency[idx].sum(1)


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_incoming_edges_add_up_to_the_models_own_values(model_type):
    """Bias-free models without a dictionary: every router logit, expert output and logit is the sum of
    its incoming edges, to float tolerance, against the model's own numbers."""
    handle = _handle(model_type)
    ids = _ids()
    ref = _hf(handle, ids)
    graph = build_graph(handle, ids, {}, batch_size=16)
    idx, sums = _rows(graph, "logit")
    for i, s in zip(idx, sums, strict=True):
        assert float(s) == pytest.approx(float(ref["logit"][graph.nodes[i].index]), abs=1e-4)
    idx, sums = _rows(graph, "router")
    assert len(idx) == len(ids) * 2 * len(handle.moe_layers)
    for i, s in zip(idx, sums, strict=True):
        n = graph.nodes[i]
        assert float(s) == pytest.approx(float(ref["router"][n.layer][n.pos, n.index]), abs=1e-4)
        assert n.index in ref["idx"][n.layer][n.pos].tolist()
    idx, sums = _rows(graph, "expert")
    for i, s in zip(idx, sums, strict=True):
        n = graph.nodes[i]
        k = ref["idx"][n.layer][n.pos].tolist().index(n.index)
        assert float(s) == pytest.approx(float(ref["experts"][n.layer][n.pos, k].norm()), rel=1e-4, abs=1e-5)


def test_with_an_sae_on_the_router_input_features_and_routers_add_up():
    """An SAE on layer 1's block input: each active feature's incoming edges plus the encoder's own bias
    (b_enc − b_dec·W_enc, folded) are its pre-activation on the block input the model computed; each
    router logit at that layer is its feature edges + error edge + W_r·b_dec."""
    handle = _handle()
    D = handle.model.config.hidden_size
    sae = _sae(D)
    ids = _ids()
    ref = _hf(handle, ids)
    graph = build_graph(handle, ids, {"s": (sae, _meta("sae", 1))}, batch_size=16)
    folded = sae.folded()
    pre = folded.pre_activations(ref["x"][1]).detach()
    lat = sae.encode(ref["x"][1]).detach()  # the unfolded coder: folding must not change which features fire
    enc_bias = (folded.b_enc - folded.b_dec @ folded.W_enc).detach()
    feats, sums = _rows(graph, "feature")
    assert len(feats) == int((lat > 0).sum()) > 0
    for i, s in zip(feats, sums, strict=True):
        n = graph.nodes[i]
        assert lat[n.pos, n.index] > 0
        assert float(s + enc_bias[n.index]) == pytest.approx(float(pre[n.pos, n.index]), abs=1e-4)
        assert n.value == pytest.approx(float(lat[n.pos, n.index]), abs=1e-4)
    W_r = handle.moe_layers[1].router.weight.detach()
    routers, sums = _rows(graph, "router")
    for i, s in zip(routers, sums, strict=True):
        n = graph.nodes[i]
        if n.layer != 1:
            continue
        sources = graph.adjacency[i].nonzero().squeeze(1).tolist()
        assert {graph.nodes[j].kind for j in sources} <= {"feature", "error"}  # the SAE is the router's only input
        assert all(graph.nodes[j].layer == 1 and graph.nodes[j].pos == n.pos for j in sources)
        assert float(s + W_r[n.index] @ folded.b_dec.detach()) == pytest.approx(float(ref["router"][1][n.pos, n.index]), abs=1e-4)


def test_zeroing_a_feature_in_a_plain_forward_moves_the_router_logit_by_the_edge():
    """Perturbation agreement: remove a_f·d_f from the block input at one position with the ordinary
    rewrite hook; the model's own router logits there move by exactly the feature → router edges."""
    handle = _handle()
    D = handle.model.config.hidden_size
    sae = _sae(D, seed=3)
    ids = _ids()
    graph = build_graph(handle, ids, {"s": (sae, _meta("sae", 1))}, batch_size=32)
    folded = sae.folded()
    base = _hf(handle, ids)["router"][1]
    feats = graph.of_kind("feature")[:6]
    for i in feats:
        f = graph.nodes[i]
        delta = f.value * folded.W_dec[f.index].detach()

        def edit(h, pos=f.pos, delta=delta):
            h = h.clone()
            h[0, pos] -= delta
            return h
        hook = rewrite_site(handle, Site("block_in", 1), edit)
        try:
            moved = _hf(handle, ids)["router"][1]
        finally:
            hook.remove()
        for r in graph.of_kind("router"):
            n = graph.nodes[r]
            if n.layer == 1 and n.pos == f.pos:
                change = float(moved[n.pos, n.index] - base[n.pos, n.index])
                assert change == pytest.approx(-float(graph.adjacency[r, i]), abs=1e-4)
                assert abs(float(graph.adjacency[r, i])) > 0  # a real effect was compared


def test_routing_free_perturbation_counts_reroutes_and_the_logit_change_from_the_models_own_forward():
    """attribution.perturb's actual side, against the model read here: zeroing each tested feature through
    the rewrite hook, the target's demeaned logit change and the number of (layer, position) whose chosen
    set changed, counted from the routing the model's own forward records."""
    from deepseemoe.attribution.perturb import routing_perturbation

    handle = _handle()
    sae = _sae(handle.model.config.hidden_size, seed=3)
    dicts = {"s": (sae, _meta("sae", 1))}
    ids = _ids()
    graph = prune(build_graph(handle, ids, dicts, batch_size=32))
    got = routing_perturbation(handle, graph, dicts, top=4)
    assert got["tested"] == 4
    folded = sae.folded()
    base = _hf(handle, ids)
    target = graph.nodes[graph.target].index
    for r in got["features"]:
        delta = r["activation"] * folded.W_dec[r["feature"]].detach()

        def edit(h, pos=r["pos"], delta=delta):
            h = h.clone()
            h[0, pos] -= delta
            return h
        hook = rewrite_site(handle, Site("block_in", 1), edit)
        try:
            moved = _hf(handle, ids)
        finally:
            hook.remove()
        assert r["actual"] == pytest.approx(float(moved["logit"][target] - base["logit"][target]), abs=1e-5)
        changed = sum(int((moved["idx"][la].sort(1).values != base["idx"][la].sort(1).values).any(1).sum())
                      for la in handle.moe_layers if la >= 1)
        assert (r["routing_changed"], r["routing_decisions"]) == (changed, len(ids) * sum(la >= 1 for la in handle.moe_layers))
        # where no route changed, only attention patterns, norm scales and gates are left to move: the
        # linear prediction is close (not exact: those are nonlinear in the model)
        if changed == 0:
            assert abs(r["actual"] - r["linear"]) <= 0.25 * abs(r["actual"]) + 1e-3


def test_last_layer_expert_to_logit_edges_by_hand():
    """An expert at the last layer writes straight into the final norm: its edge to a logit is
    (W_U[v] − mean W_U)·(c ⊙ o), c the final norm's scale at the prompt (read from the model's norm),
    o the expert's weighted output from the experts module."""
    handle = _handle()
    ids = _ids()
    ref = _hf(handle, ids)
    seen = {}
    norm = handle.model.model.norm
    hook = norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0][0, -1].detach(), y=o[0, -1].detach()))
    handle.model(ids[None])
    hook.remove()
    c = seen["y"] / seen["x"]
    W_U = handle.model.lm_head.weight.detach()
    graph = build_graph(handle, ids, {}, batch_size=16)
    last = handle.num_layers - 1
    checked = 0
    for t in graph.of_kind("logit"):
        v = graph.nodes[t].index
        for s in graph.of_kind("expert"):
            n = graph.nodes[s]
            if n.layer == last and n.pos == len(ids) - 1:
                k = ref["idx"][last][n.pos].tolist().index(n.index)
                o = ref["experts"][last][n.pos, k]
                hand = float((W_U[v] - W_U.mean(0)) @ (c * o))
                assert float(graph.adjacency[t, s]) == pytest.approx(hand, abs=1e-5)
                checked += 1
    assert checked == 2 * len(graph.of_kind("logit"))


def test_a_skip_transcoder_replaces_the_block_and_its_features_add_up():
    """A skip transcoder at layer 0: no routing nodes there; each feature's edges + b_enc equal its
    pre-activation on the block input the model computed; logits still add up (its b_dec is a bias)."""
    handle = _handle()
    D = handle.model.config.hidden_size
    tc = _sae(D, seed=5, transcoder=True, skip=True)
    ids = _ids()
    ref = _hf(handle, ids)
    graph = build_graph(handle, ids, {"t": (tc, _meta("skip_transcoder", 0))}, batch_size=16)
    assert not [i for i in graph.of_kind("router") if graph.nodes[i].layer == 0]
    assert graph.summary["notes"] and "replaces the MoE block" in graph.summary["notes"][0]
    folded = tc.folded()
    pre = folded.pre_activations(ref["x"][0]).detach()
    feats, sums = _rows(graph, "feature")
    assert feats
    for i, s in zip(feats, sums, strict=True):
        n = graph.nodes[i]
        assert float(s + folded.b_enc[n.index]) == pytest.approx(float(pre[n.pos, n.index]), abs=1e-4)
    idx, sums = _rows(graph, "logit")
    for i, s in zip(idx, sums, strict=True):
        assert float(s + graph.bias[i]) == pytest.approx(float(ref["logit"][graph.nodes[i].index]), abs=1e-4)


def test_router_nodes_record_weight_margin_and_jacobian_of_the_routers_rule():
    """Weight = the weight the experts received; margin = logit minus the best unchosen logit (by hand
    from the model's router logits); Jacobian of a renormalised softmax top-2 by hand:
    w_i = e^{z_i}/(e^{z_i}+e^{z_j}) → ∂w_i/∂z_i = w_i·w_j = −∂w_i/∂z_j."""
    handle = _handle("mixtral")
    ids = _ids()
    ref = _hf(handle, ids)
    graph = build_graph(handle, ids, {}, batch_size=32)
    for r in graph.of_kind("router"):
        n = graph.nodes[r]
        z = ref["router"][n.layer][n.pos]
        chosen = ref["idx"][n.layer][n.pos].tolist()
        other = next(e for e in chosen if e != n.index)
        w_i = float(torch.softmax(z[chosen], 0)[chosen.index(n.index)])
        assert n.extra["weight"] == pytest.approx(w_i, abs=1e-5)
        best_out = max(float(z[e]) for e in range(len(z)) if e not in chosen)
        assert n.extra["margin"] == pytest.approx(float(z[n.index]) - best_out, abs=1e-5)
        assert n.extra["dweight_dlogit"][n.index] == pytest.approx(w_i * (1 - w_i), abs=1e-5)
        assert n.extra["dweight_dlogit"][other] == pytest.approx(-w_i * (1 - w_i), abs=1e-5)


def test_pruning_keeps_tokens_and_logits_and_reports_kept_influence():
    handle = _handle()
    graph = prune(build_graph(handle, _ids(), {"s": (_sae(64), _meta("sae", 1))}, batch_size=32))
    mask = graph.node_mask
    for i in graph.of_kind("token") + graph.of_kind("logit"):
        assert mask[i]
    assert 0 < graph.summary["kept_nodes"] < graph.summary["nodes"]
    assert 0.0 < graph.summary["kept_influence"] <= 1.0
    # every kept edge joins two kept nodes
    t, s = graph.edge_mask.nonzero(as_tuple=True)
    assert bool(mask[t].all() and mask[s].all())


def test_gpt_oss_sinks_and_gate_rule_against_its_own_forward():
    """GPT-OSS: attention sinks, an interleaved gate_up with its own clamped gate rule, biases in the router
    and the experts. The frozen forward reproduces its logits and expert outputs (build_graph refuses
    otherwise); feature/router/expert values are Hugging Face's; each router logit is its edges plus the
    router's bias and the SAE's decoder bias through the router; an expert node's edges plus bias are its
    value. Held-gate edges are checked by hand: the edge from a feature to an expert is the expert's own
    output, gate columns held, along the feature's decoder direction."""
    handle = _handle("gpt_oss")
    attn = handle.model.model.layers[0].self_attn
    assert attn.sinks.abs().max() > 0.01  # the sinks matter: ignoring them changes the logits
    D = handle.model.config.hidden_size
    sae = _sae(D, seed=4)
    ids = _ids()
    ref = _hf(handle, ids)
    graph = build_graph(handle, ids, {"s": (sae, _meta("sae", 1))}, batch_size=32)
    folded = sae.folded()
    router = handle.moe_layers[1].router
    W_r, b_r = router.weight.detach(), router.bias.detach()
    for r, s in zip(*_rows(graph, "router"), strict=True):
        n = graph.nodes[r]
        want = float(ref["router"][n.layer][n.pos, n.index])
        assert n.value == pytest.approx(want, abs=1e-4)
        if n.layer == 1:
            bias = float(b_r[n.index] + W_r[n.index] @ folded.b_dec.detach())
            assert float(s) + bias == pytest.approx(want, abs=1e-4)
    for x, s in zip(*_rows(graph, "expert"), strict=True):
        n = graph.nodes[x]
        k = ref["idx"][n.layer][n.pos].tolist().index(n.index)
        assert n.value == pytest.approx(float(ref["experts"][n.layer][n.pos, k].norm()), rel=1e-4, abs=1e-5)
        assert float(s + graph.bias[x]) == pytest.approx(n.value, rel=1e-4, abs=1e-5)
    # by hand: expert e at layer 1, position p, and a feature f at (1, p). The expert's output with its gate
    # held is linear in the input along d = a_f·W_dec[f]: edge = ((y(x + εd) − y(x)) / ε) · unit, with
    # the gate half of gate_up fixed at x — computed from the raw weights in GPT-OSS's own layout
    ex = handle.moe_layers[1].experts
    w = {n: p.detach() for n, p in ex.named_parameters()}

    def held(xv, gate_at, e):
        gu = xv @ w["gate_up_proj"][e] + w["gate_up_proj_bias"][e]
        gate = (gate_at @ w["gate_up_proj"][e] + w["gate_up_proj_bias"][e])[..., ::2].clamp(max=ex.limit)
        up = gu[..., 1::2].clamp(-ex.limit, ex.limit)
        h = gate * torch.sigmoid(gate * ex.alpha) * (up + 1)
        return h @ w["down_proj"][e] + w["down_proj_bias"][e]
    checked = 0
    for x in graph.of_kind("expert"):
        n = graph.nodes[x]
        if n.layer != 1:
            continue
        k = ref["idx"][1][n.pos].tolist().index(n.index)
        weight = float(graph.nodes[x].extra["weight"])
        unit = ref["experts"][1][n.pos, k] / ref["experts"][1][n.pos, k].norm()
        x0 = ref["x"][1][n.pos]
        for f in graph.of_kind("feature"):
            fn = graph.nodes[f]
            if fn.pos != n.pos or graph.adjacency[x, f] == 0:
                continue
            d = fn.value * folded.W_dec[fn.index].detach()
            eps = 1e-3
            dy = (held(x0 + eps * d, x0, n.index) - held(x0, x0, n.index)) / eps * weight
            assert float(dy @ unit) == pytest.approx(float(graph.adjacency[x, f]), rel=2e-2, abs=2e-4)
            checked += 1
    assert checked > 5
