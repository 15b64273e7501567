"""`deepseemoe wiring`: the virtual weights by hand, planted modules recovered (along experts and
across them), random weights found null at 2 and 6 layers, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from deepseemoe.compare.wiring import feed_forward_neurons, wiring_graph
from deepseemoe.graphs.modules import find_modules, nmi


def _chained_moe():
    """3 layers × 4 experts; expert c of every layer reads and writes only residual dims 16c..16c+15,
    so every path between neurons stays inside one chain c: the wiring's planted modules."""
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    model = tiny_model("olmoe", num_hidden_layers=3, num_experts=4, vocab_size=64)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for c in range(4):
                keep = torch.zeros(64, dtype=torch.bool)
                keep[16 * c:16 * (c + 1)] = True
                ex.gate_up_proj[c][:, ~keep] = 0  # [2F, D]: reads only its dims
                ex.down_proj[c][~keep, :] = 0  # [D, F]: writes only its dims
    return handle_from_model(model)


def _random_handle(kind: str, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    torch.manual_seed(seed)
    if kind == "moe":
        model = tiny_model("olmoe", num_hidden_layers=layers, num_experts=8, vocab_size=64, intermediate_size=32)
        with torch.no_grad():  # i.i.d. normal weights, whatever the initialiser did
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj.normal_()
                layer.mlp.experts.down_proj.normal_()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256,
                                             num_hidden_layers=layers, num_attention_heads=4))
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    lin.weight.normal_()
    return handle_from_model(model)


@pytest.mark.parametrize(("kind", "layers"), [("dense", 2), ("dense", 6), ("moe", 2), ("moe", 6)])
def test_random_weights_have_no_significant_modules(kind, layers):
    """I.i.d. weights have no modules beyond what a layered graph of the same degrees has: the null
    rewires within each pair of consecutive layers, so |z| < 3 (a rewiring across layers gave z = 35
    at 6 layers); the experts add nothing to NMI beyond the within-layer shuffle."""
    from deepseemoe.compare.wiring import wiring_modules

    r = wiring_modules(_random_handle(kind, layers, seed=layers), fan_in=8, draws=8, seed=0)
    assert abs(r["z"]) < 3, r
    if kind == "moe":
        assert abs(r["nmi_expert_excess"]) < 0.02 and abs(r["nmi_expert_z"]) < 3, r
        assert r["nmi_expert_null"] > 0  # the layer inside the label carries NMI: the null holds it too


def test_rewiring_within_layer_pairs_keeps_the_graph_layered():
    from deepseemoe.graphs.modules import rewired

    g, _ = wiring_graph(feed_forward_neurons(_random_handle("dense", 4, seed=0)), fan_in=4)
    r = rewired(g, seed=1, part=lambda n: n[0])
    assert all(abs(u[0] - v[0]) == 1 for u, v in r.edges())

    def per_side(graph):
        return {(n, m[0]): sum(1 for x in graph[n] if x[0] == m[0]) for n in graph for m in graph[n]}

    assert per_side(r) == per_side(g)
    assert sum(1 for e in r.edges() if g.has_edge(*e)) < 0.5 * g.number_of_edges()
    for pair in ((0, 1), (1, 2), (2, 3)):  # the weights of each layer pair stay with that pair
        def weights(graph, pair=pair):
            return sorted(w for u, v, w in graph.edges(data="weight") if {u[0], v[0]} == set(pair))
        assert weights(r) == pytest.approx(weights(g))


def _across_experts_moe():
    """3 layers × 4 experts; neuron i of every expert reads and writes only residual dims 16c..16c+15
    with c = i mod 4: planted chains that cut across the experts (each expert holds all four)."""
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    model = tiny_model("olmoe", num_hidden_layers=3, num_experts=4, vocab_size=64)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            F = ex.down_proj.shape[2]
            for e in range(4):
                for i in range(F):
                    c = i % 4
                    off = torch.ones(64, dtype=torch.bool)
                    off[16 * c:16 * (c + 1)] = False
                    ex.gate_up_proj[e][i, off] = 0
                    ex.gate_up_proj[e][F + i, off] = 0
                    ex.down_proj[e][off, i] = 0
    return handle_from_model(model)


def test_planted_modules_along_and_across_experts():
    from deepseemoe.compare.wiring import wiring_modules

    along = wiring_modules(_chained_moe(), fan_in=4, draws=5)
    assert along["z"] > 10 and along["nmi_expert_excess"] > 0.5 and along["nmi_expert_z"] > 10
    assert along["nmi_layer"] < 0.1  # the chains run through every layer
    handle = _across_experts_moe()
    across = wiring_modules(handle, fan_in=4, draws=5)
    assert across["z"] > 10
    assert abs(across["nmi_expert_excess"]) < 0.02  # the modules are real, but they are not the experts
    layers = feed_forward_neurons(handle)
    g, _ = wiring_graph(layers, fan_in=4)
    F = handle.model.model.layers[0].mlp.experts.down_proj.shape[2]
    mods = find_modules(g, draws=1, part=lambda n: n[0])
    assert nmi(mods.membership(), {n: (n[1] % F) % 4 for n in g.nodes}) >= 0.9


def test_virtual_weights_by_hand():
    handle = _chained_moe()
    layers = feed_forward_neurons(handle)
    ex0, ex1 = handle.model.model.layers[0].mlp.experts, handle.model.model.layers[1].mlp.experts
    F = ex0.down_proj.shape[2]
    assert [len(la.read) for la in layers] == [4 * F] * 3
    g, kept = wiring_graph(layers, fan_in=3)
    # neuron j of expert 2 in layer 1 reads with gate row j of expert 2; neuron i of expert 2 in layer 0
    # writes with column i of expert 2's down projection
    j, gate_row = 5, ex1.gate_up_proj[2][5]
    by_hand = torch.stack([gate_row @ ex0.down_proj[e][:, i] for e in range(4) for i in range(F)]).abs()
    top = by_hand.topk(3)
    for v, u in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        assert g[(0, u)][(1, 2 * F + j)]["weight"] == pytest.approx(v, rel=1e-5)
    assert all(u // F == 2 for u in top.indices.tolist())  # inside its chain
    assert g.degree((1, 2 * F + j)) >= 3 and 0 < kept["mass_kept"] <= 1


def test_planted_chains_are_the_modules():
    handle = _chained_moe()
    layers = feed_forward_neurons(handle)
    g, _ = wiring_graph(layers, fan_in=4)
    F = len(layers[0].read) // 4
    mods = find_modules(g, draws=3)
    chain = {n: n[1] // F for n in g.nodes}
    assert nmi(mods.membership(), chain) >= 0.9
    assert mods.z > 10


def test_wiring_cli(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2)).save_pretrained(dense)
    r = cli("wiring", tiny_olmoe_dir, dense, "--out", tmp_path / "study" / "wiring", "--draws", "2", "--fan-in", "4")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "study" / "wiring" / "wiring.json").read_text())
    moe, mlp = result["models"]
    assert moe["kind"] == "moe" and 0 <= moe["nmi_expert"] <= 1 and mlp["kind"] == "dense"
    assert {"nmi_expert_null", "nmi_expert_excess", "nmi_expert_z", "nmi_layer"} <= set(moe)
    assert "consecutive layers" in moe["null"]
    assert mlp["neurons"] == 2 * 64 and 64 * 4 <= mlp["edges"] <= 2 * 64 * 4
    assert "nmi_expert" not in mlp
    # beside a routing run, the report shows the table
    assert cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "study" / "run",
               "--max-tokens", "500", "--ctx-len", "32").code == 0
    assert cli("stats", tmp_path / "study" / "run").code == 0
    # a second wiring folder in the study: the report shows both, each named, none dropped
    assert cli("wiring", dense, "--out", tmp_path / "study" / "wiring-dense", "--draws", "2", "--fan-in", "4").code == 0
    assert cli("report", tmp_path / "study").code == 0  # the study folder, as `serve` takes it
    page = next((tmp_path / "study").rglob("index.html")).read_text()
    assert '<h2 id="wiring">' in page and '<h2 id="wiring-2">' in page
    assert "<code>wiring</code>" in page and "<code>wiring-dense</code>" in page
    for r in result["models"]:
        assert (f"<td>{r['modules']}</td><td>{r['modularity']:.3f}</td><td>{r['rewired_modularity']:.3f}</td>"
                in page)
