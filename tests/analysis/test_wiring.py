"""`deepseemoe wiring`: the virtual weights by hand, planted modules recovered, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from deepseemoe.analysis.modules import find_modules, nmi
from deepseemoe.analysis.wiring import feed_forward_neurons, wiring_graph


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
    assert mlp["neurons"] == 2 * 64 and 64 * 4 <= mlp["edges"] <= 2 * 64 * 4
    assert "nmi_expert" not in mlp
    # beside a routing run, the report shows the table
    assert cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "study" / "run",
               "--max-tokens", "500", "--ctx-len", "32").code == 0
    assert cli("stats", tmp_path / "study" / "run").code == 0
    assert cli("report", tmp_path / "study" / "run").code == 0
    page = next((tmp_path / "study").rglob("index.html")).read_text()
    assert '<h2 id="wiring">' in page
    for r in result["models"]:
        assert (f"<td>{r['modules']}</td><td>{r['modularity']:.3f}</td><td>{r['rewired_modularity']:.3f}</td>"
                in page)
