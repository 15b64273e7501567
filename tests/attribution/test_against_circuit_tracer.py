"""Against circuit-tracer's own attribution: with every MoE block replaced by a transcoder, or all of
them by one cross-layer transcoder (the models circuit-tracer can build), our graph's feature → feature,
error → feature, token → feature and feature → logit edges equal the adjacency circuit-tracer computes
for the same prompt, with its code."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.attribution.graph import build_graph
from tests.dictionaries.test_circuit_tracer_e2e import circuit_tracer_model, randomised, replacement_model

PROMPT = "def add(a, b): return a + b"


def _graphs(handle, rm, dicts):
    """(circuit-tracer's graph, ours) of PROMPT after a BOS, with the same logits."""
    from circuit_tracer import attribute

    ids = handle.tokenizer(PROMPT, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([torch.tensor([handle.tokenizer.bos_token_id]), ids])
    theirs = attribute(ids, rm, max_n_logits=3, desired_logit_prob=0.99, batch_size=64, max_feature_nodes=None)
    ours = build_graph(handle, ids, dicts, max_logits=3, logit_coverage=0.99, batch_size=64)
    return ids, theirs, ours


def _compare(ids, theirs, ours, L: int) -> list[tuple]:
    """Every edge among the nodes both graphs have, away from BOS (circuit-tracer zeroes the features at
    position 0: its error there holds them), equal; the source and target keys of the nonzero ones."""
    S = len(ids)
    feats = theirs.active_features[theirs.selected_features].tolist()  # (layer, pos, feature) per row
    n_f = len(feats)
    theirs_index = {("feature", la, p, f): i for i, (la, p, f) in enumerate(feats)}
    theirs_index.update({("error", la, p, -1): n_f + la * S + p for la in range(L) for p in range(S)})
    theirs_index.update({("token", -1, p, int(ids[p])): n_f + L * S + p for p in range(S)})
    logit_ids = [int(t.vocab_idx) if hasattr(t, "vocab_idx") else int(t) for t in theirs.logit_targets]
    theirs_index.update({("logit", L, S - 1, v): n_f + L * S + S + j for j, v in enumerate(logit_ids)})
    # a feature numbered within its layer, as circuit-tracer numbers a CLT's
    ours_index = {(n.kind, n.layer, n.pos, n.extra.get("layer_feature", n.index)): i for i, n in enumerate(ours.nodes)}
    assert [ours.nodes[i].index for i in ours.of_kind("logit")] == logit_ids
    assert {k for k in theirs_index if k[0] == "feature" and k[2] > 0} == \
        {k for k in ours_index if k[0] == "feature" and k[2] > 0}  # the same active features
    keys = [k for k in theirs_index if k[2] > 0 and k in ours_index]
    targets = [k for k in keys if k[0] in ("feature", "logit")]
    assert len([k for k in targets if k[0] == "feature"]) > 20
    A_t, A_o = theirs.adjacency_matrix, ours.adjacency
    nonzero = []
    for t in targets:
        for s in keys:
            if s[0] == "logit":
                continue
            want = float(A_t[theirs_index[t], theirs_index[s]])
            got = float(A_o[ours_index[t], ours_index[s]])
            assert got == pytest.approx(want, abs=2e-3, rel=2e-3), (t, s)
            if want != 0:
                nonzero.append((s, t))
    assert len(nonzero) > 200
    return nonzero


@pytest.mark.parametrize("skip", [False, True])
def test_edges_equal_circuit_tracers_adjacency(tmp_path, tiny_olmoe_dir, monkeypatch, skip):
    handle, coders, rm = replacement_model(tiny_olmoe_dir, tmp_path, monkeypatch, skip)
    kind = "skip_transcoder" if skip else "transcoder"
    dicts = {f"t{la}": (c, {"kind": kind, "source": [["block_in", la]], "target": [["block_out", la]]})
             for la, c in coders.items()}
    ids, theirs, ours = _graphs(handle, rm, dicts)
    _compare(ids, theirs, ours, handle.num_layers)


def _clt_replacement_model(tiny_olmoe_dir, tmp_path, monkeypatch):
    """The tiny OLMoE with one random cross-layer transcoder over all its layers, exported in circuit-tracer's
    layout and loaded by its own code into its ReplacementModel: (our handle, our CLT, theirs)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.formats import CIRCUIT_TRACER_HOOKS, save_circuit_tracer
    from deepseemoe.models.load import load_model

    handle = load_model(str(tiny_olmoe_dir))
    D, L = handle.model.config.hidden_size, handle.num_layers
    torch.manual_seed(7)
    clt = randomised(build_coder(CoderConfig(d_in=L * D, d_out=L * D, n_latents=L * 40, activation="jumprelu",
                                             n_sites=L, cross_layer=True)))
    save_circuit_tracer(clt, tmp_path / "clt")
    theirs = load_clt(str(tmp_path / "clt"), feature_input_hook=CIRCUIT_TRACER_HOOKS["block_in"],
                      feature_output_hook=CIRCUIT_TRACER_HOOKS["block_out"], scan="tiny-olmoe",
                      device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    return handle, clt, circuit_tracer_model(tiny_olmoe_dir, handle, theirs, monkeypatch)


def test_cross_layer_transcoder_edges_equal_circuit_tracers(tmp_path, tiny_olmoe_dir, monkeypatch):
    """A CLT's feature writes at its own layer and every later one; circuit-tracer sums those writes into
    one edge per target. Every edge among features, errors, tokens and logits equals its adjacency."""
    handle, clt, rm = _clt_replacement_model(tiny_olmoe_dir, tmp_path, monkeypatch)
    layers = list(range(handle.num_layers))
    meta = {"kind": "clt", "source": [["block_in", la] for la in layers], "target": [["block_out", la] for la in layers]}
    ids, theirs, ours = _graphs(handle, rm, {"clt": (clt, meta)})
    F_site = clt.cfg.latents_per_group
    for n in ours.nodes:  # our node numbers the CLT's latent; circuit-tracer numbers within the layer
        if n.kind == "feature":
            assert n.index == n.layer * F_site + n.extra["layer_feature"]
    nonzero = _compare(ids, theirs, ours, handle.num_layers)
    # a feature of layer 0 reaching the logits: through its own write and its write at layer 1
    assert any(s[0] == "feature" and s[1] == 0 and t[0] == "logit" for s, t in nonzero)
    # completeness holds through the several writes: each feature's incoming edges + bias = its value
    rows = ours.of_kind("feature") + ours.of_kind("logit")
    values = torch.tensor([ours.nodes[i].value for i in rows])
    torch.testing.assert_close(ours.adjacency[rows].sum(1) + ours.bias[rows], values, atol=1e-4, rtol=1e-4)
