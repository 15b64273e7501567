"""Modules of sparse graphs with known answers: planted communities are recovered and significant,
a random graph of the same kind is not; the feature–expert graph of a hand-made map keeps exactly
the edges its thresholds name; `deepseemoe graph` writes what it reports."""

from __future__ import annotations

import json
import math

import networkx as nx
import pytest

from deepseemoe.graphs.modules import find_modules, nmi


def _weighted(g):
    for u, v in g.edges():
        g[u][v]["weight"] = 1.0
    return g


def test_planted_communities_are_recovered_with_a_large_z():
    sizes = [40, 40, 40, 40]
    g = _weighted(nx.stochastic_block_model(sizes, [[0.3 if i == j else 0.01 for j in range(4)] for i in range(4)],
                                            seed=1))
    planted = {n: d["block"] for n, d in g.nodes(data=True)}
    modules = find_modules(g, draws=8, seed=0)
    assert nmi(modules.membership(), planted) >= 0.9
    assert modules.z > 10 and max(modules.rewired_modularity) < modules.modularity - 0.2


def test_rewiring_keeps_degrees_and_weights_and_moves_edges():
    from deepseemoe.graphs.modules import rewired

    g = nx.stochastic_block_model([30, 30], [[0.3, 0.02], [0.02, 0.3]], seed=3)
    for i, (u, v) in enumerate(g.edges()):
        g[u][v]["weight"] = float(i)
    r = rewired(g, seed=0)
    assert dict(r.degree()) == dict(g.degree())
    assert sorted(w for _, _, w in r.edges(data="weight")) == sorted(w for _, _, w in g.edges(data="weight"))
    kept = sum(1 for e in r.edges() if g.has_edge(*e))
    assert kept < 0.3 * g.number_of_edges()


def test_a_random_graph_has_no_significant_modules():
    g = _weighted(nx.gnm_random_graph(160, 160 * 6, seed=2))
    modules = find_modules(g, draws=8, seed=0)
    assert modules.modularity > 0.15  # Louvain finds "modules" in any sparse graph: Q alone is no evidence
    assert abs(modules.z) < 3


def _random_feature_expert_graph(seed: int, features: int = 300, experts: int = 16):
    import random

    rng, g = random.Random(seed), nx.Graph()
    for f in range(features):
        for e in rng.sample(range(experts), 3):
            g.add_edge(f"f{f}", f"E{e}", weight=rng.random())
    return g


def test_bipartite_rewiring_keeps_the_graph_bipartite():
    """A feature–expert graph rewired with parts (the node's kind) stays bipartite, every node keeps
    its degree, and each edge's weight stays with its expert (whose strength is kept)."""
    from deepseemoe.graphs.modules import rewired

    g = _random_feature_expert_graph(0)
    r = rewired(g, seed=1, part=lambda n: n[0])
    assert all(u[0] != v[0] for u, v in r.edges())
    assert dict(r.degree()) == dict(g.degree())
    strength = {n: pytest.approx(s) for n, s in g.degree(weight="weight") if n.startswith("E")}
    assert {n: s for n, s in r.degree(weight="weight") if n.startswith("E")} == strength
    assert sum(1 for e in r.edges() if g.has_edge(*e)) < 0.5 * g.number_of_edges()
    # the unconstrained swap joins features to features and experts to experts
    free = rewired(g, seed=1)
    assert any(u[0] == v[0] for u, v in free.edges())


def test_a_random_feature_expert_graph_has_no_significant_modules():
    g = _random_feature_expert_graph(3)
    modules = find_modules(g, draws=8, seed=0, part=lambda n: n[0])
    assert abs(modules.z) < 3


def test_label_alignment_against_a_stratified_shuffle():
    """NMI with labels that carry their stratum (an expert label names its layer): modules that are
    the strata score NMI > 0 for the labels, all of it explained by the within-stratum shuffle; modules
    that are the labels score far above it."""
    import random

    from deepseemoe.graphs.modules import aligned

    rng = random.Random(0)
    nodes = [(layer, i) for layer in range(6) for i in range(64)]
    expert = {n: (n[0], rng.randrange(8)) for n in nodes}
    bands = {n: n[0] // 2 for n in nodes}  # modules that are bands of layers
    depth = aligned(bands, expert, stratum=lambda n: n[0], draws=50)
    assert depth.nmi > 0.2 and abs(depth.excess) < 0.01 and abs(depth.z) < 3
    unstratified = aligned(bands, expert, draws=50)  # shuffled across layers, the depth counts as "expert"
    assert unstratified.excess > 0.2
    along = aligned(expert, expert, stratum=lambda n: n[0], draws=50)
    assert along.nmi == pytest.approx(1.0) and along.excess > 0.3 and along.z > 10  # the null keeps the depth share


def test_nmi_by_hand():
    a = {0: "x", 1: "x", 2: "y", 3: "y"}
    assert nmi(a, {0: 1, 1: 1, 2: 2, 3: 2}) == pytest.approx(1.0)
    assert nmi(a, {0: 1, 1: 2, 2: 1, 3: 2}) == pytest.approx(0.0)
    # one mismatch of four: H(A) = H(B) = log 2; I = Σ p log(p / (p_a p_b)) over the joint cells
    b = {0: 1, 1: 1, 2: 1, 3: 2}
    ha, hb = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.25))
    assert nmi(a, b) == pytest.approx(mi / ((ha + hb) / 2))


def _hand_map():
    """A map of 6 features over 2 experts: features 0–2 push and route to E0, 3–5 to E1 (its summary and
    tables as `DictionaryRun.map_summary` / `map_tables` give them)."""
    return {"layer": 3, "num_experts": 2}, {
        "router_attribution": {"feature": [0, 0, 1, 2, 3, 4, 5, 5], "expert": [0, 1, 0, 0, 1, 1, 1, 0],
                               "mean_push_when_active": [0.5, 0.01, 0.4, 0.3, 0.6, 0.2, 0.04, -0.3]},
        "feature_experts": {"feature": [0, 1, 3, 5, 5], "expert": [0, 0, 1, 1, 0], "count": [10, 3, 10, 10, 10],
                            "p_e_given_f": [0.9, 0.9, 0.8, 0.7, 0.3], "lift": [1.8, 2.0, 1.6, 1.4, 0.6]},
        "expert_composition": None,
        "features": {"feature": list(range(6)), "top_expert": [0, 0, 0, 1, 1, 1]}}


def test_feature_expert_graph_keeps_exactly_the_thresholded_edges(tmp_path):
    from deepseemoe.features.graph import Thresholds, build_graph

    fg = build_graph(*_hand_map(), Thresholds(router_min=0.1, lift_min=1.5, count_min=5))
    g = fg.graph
    # router: pushes ≥ 0.1 → (0,0) .5, (1,0) .4, (2,0) .3, (3,1) .6, (4,1) .2; routing: lift ≥ 1.5 and
    # count ≥ 5 → (0,0) .9, (3,1) .8 (feature 1 has lift 2.0 but 3 tokens)
    assert {(u, v) if u.startswith("f") else (v, u) for u, v in g.edges()} == \
        {("f0", "E0"), ("f1", "E0"), ("f2", "E0"), ("f3", "E1"), ("f4", "E1")}
    assert g["f0"]["E0"]["weight"] == pytest.approx(0.5 + 0.9)
    assert g["f3"]["E1"]["weight"] == pytest.approx(0.6 + 0.8)
    router, routing = fg.edge_kinds
    assert (router.candidates, router.kept) == (7, 5)  # the negative push is no candidate
    assert router.mass_share == pytest.approx((0.5 + 0.4 + 0.3 + 0.6 + 0.2) / (0.5 + 0.01 + 0.4 + 0.3 + 0.6 + 0.2 + 0.04))
    assert (routing.candidates, routing.kept) == (5, 2)
    assert fg.top_expert == {"f0": "E0", "f1": "E0", "f2": "E0", "f3": "E1", "f4": "E1"}  # f5 has no edge


def test_graph_cli_on_a_mapped_dictionary(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    """`graph` on a real (tiny) trained and mapped block-input SAE: what it writes adds up."""
    import pyarrow.parquet as pq
    import yaml

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 30) + "\n")
    run, name = tmp_path / "run", "router_sae"
    config = {"model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(run), "ctx_len": 32, "tokens": 1024,
              "coders": [{"kind": "sae", "site": "block_in", "layers": [1], "k": 4, "expansion_factor": 2,
                          "name": name},
                         {"kind": "sae", "layers": [0], "k": 4, "expansion_factor": 2, "name": "resid_sae_0"}],
              "train": {"batch_size": 128, "buffer_size": 256}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli("train", str(tmp_path / "run.yaml")).code == 0
    assert cli("map", str(run), "--dictionary", name, "--tokens", "600").code == 0
    r = cli("graph", str(run), "--dictionary", name, "--lift-min", "1.5", "--draws", "3")
    assert r.code == 0, r.err
    folder = run / "graphs" / name
    summary = json.loads((folder / "summary.json").read_text())
    nodes, edges = pq.read_table(folder / "nodes.parquet").to_pandas(), pq.read_table(folder / "edges.parquet").to_pandas()
    assert summary["edges"] == len(edges) and sum(k["kept"] for k in summary["edge_kinds"]) >= len(edges)
    connected = set(edges["u"]) | set(edges["v"])
    assert summary["nodes"] == len(connected) and nodes["module"].notna().sum() == len(connected)
    assert (folder / "layout.png").read_bytes()[:4] == b"\x89PNG"
    assert len(summary["rewired_modularity"]) == 3 and summary["modules"] >= 1
    missing = cli("graph", str(run), "--dictionary", "nope")
    assert missing.code == 2 and "deepseemoe map" in missing.error_lines[0]
    # with the features of an upstream SAE (layer 0's residual): feature edges, weighed by hand
    from deepseemoe.dictionaries.formats import load_run_dictionary

    r = cli("graph", str(run), "--dictionary", name, "--lift-min", "1.5", "--draws", "3", "--upstream", "resid_sae_0",
            "--fan-in", "2", "--link-min", "0")
    assert r.code == 0, r.err
    summary = json.loads((folder / "summary.json").read_text())
    edges = pq.read_table(folder / "edges.parquet").to_pandas()
    links = edges[edges["u"].str.startswith("u") | edges["v"].str.startswith("u")]
    kind = next(k for k in summary["edge_kinds"] if k["kind"] == "feature")
    assert summary["upstream"] == "resid_sae_0" and kind["kept"] == len(links) > 0
    up, down = load_run_dictionary(run, "resid_sae_0")[0].folded(), load_run_dictionary(run, name)[0].folded()
    w = (up.W_dec.double() @ down.W_enc.double()).abs()
    for u, v, weight in links.itertuples(index=False):
        i, j = (int(u[1:]), int(v[1:])) if u.startswith("u") else (int(v[1:]), int(u[1:]))
        assert weight == pytest.approx(float(w[i, j]), rel=1e-6)
        assert float(w[i, j]) >= float(w[:, j].topk(2).values[-1]) - 1e-12  # among its 2 strongest inputs
    refused = cli("graph", str(run), "--dictionary", name, "--upstream", name)
    assert refused.code == 2 and len(refused.error_lines) == 1 and "itself" in refused.error_lines[0]


def test_feature_links_by_hand():
    """Upstream feature i writes d_i, downstream feature j reads e_j: w_ij = |d_i · e_j|, the fan_in
    strongest per downstream feature kept when ≥ link_min; sites that cannot be linked are refused."""
    import torch

    from deepseemoe.capture.core import Site
    from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.features.graph import Thresholds, feature_links

    up, down = SparseCoder(CoderConfig(d_in=4, n_latents=3, k=1)), SparseCoder(CoderConfig(d_in=4, n_latents=2, k=1))
    with torch.no_grad():
        up.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0, 0.8, 0]]))
        down.W_enc.copy_(torch.tensor([[2.0, 0], [0, -1.0], [0, 0.05], [0, 0]]))
    rows, kind = feature_links(up, Site("resid_out", 0), down, Site("block_in", 1), Thresholds(link_min=0.1, fan_in=2))
    # w = |W_dec_up @ W_enc_down| = [[2, 0], [0, 1], [1.2, 0.04]]
    assert sorted(rows) == [(0, 0, pytest.approx(2.0)), (1, 1, pytest.approx(1.0)), (2, 0, pytest.approx(1.2))]
    assert kind.candidates == 4 and kind.kept == 3 and kind.mass == pytest.approx(4.24)
    with pytest.raises(DeepSeeMoEError, match="must write before"):
        feature_links(up, Site("resid_out", 1), down, Site("block_in", 1))
    with pytest.raises(DeepSeeMoEError, match="reads it"):
        feature_links(up, Site("block_in", 0), down, Site("block_in", 1))
