"""Against circuit-tracer's own attribution: with every MoE block replaced by a transcoder (the model
circuit-tracer can build), our graph's feature → feature, error → feature, token → feature and
feature → logit edges equal the adjacency circuit-tracer computes for the same prompt, with its code."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.attribution.graph import build_graph
from tests.dictionaries.test_circuit_tracer_e2e import replacement_model


@pytest.mark.parametrize("skip", [False, True])
def test_edges_equal_circuit_tracers_adjacency(tmp_path, tiny_olmoe_dir, monkeypatch, skip):
    from circuit_tracer import attribute

    handle, coders, rm = replacement_model(tiny_olmoe_dir, tmp_path, monkeypatch, skip)
    ids = handle.tokenizer("def add(a, b): return a + b", return_tensors="pt")["input_ids"][0]
    ids = torch.cat([torch.tensor([handle.tokenizer.bos_token_id]), ids])
    theirs = attribute(ids, rm, max_n_logits=3, desired_logit_prob=0.99, batch_size=64, max_feature_nodes=None)

    kind = "skip_transcoder" if skip else "transcoder"
    dicts = {f"t{la}": (c, {"kind": kind, "source": [["block_in", la]], "target": [["block_out", la]]})
             for la, c in coders.items()}
    ours = build_graph(handle, ids, dicts, max_logits=3, logit_coverage=0.99, batch_size=64)

    S, L = len(ids), handle.num_layers
    feats = theirs.active_features[theirs.selected_features].tolist()  # (layer, pos, feature) per row
    n_f = len(feats)
    theirs_index = {("feature", la, p, f): i for i, (la, p, f) in enumerate(feats)}
    theirs_index.update({("error", la, p, -1): n_f + la * S + p for la in range(L) for p in range(S)})
    theirs_index.update({("token", -1, p, int(ids[p])): n_f + L * S + p for p in range(S)})
    logit_ids = [int(t.vocab_idx) if hasattr(t, "vocab_idx") else int(t) for t in theirs.logit_targets]
    theirs_index.update({("logit", L, S - 1, v): n_f + L * S + S + j for j, v in enumerate(logit_ids)})
    ours_index = {(n.kind, n.layer, n.pos, n.index): i for i, n in enumerate(ours.nodes)}
    assert [ours.nodes[i].index for i in ours.of_kind("logit")] == logit_ids

    # circuit-tracer zeroes the features at BOS (its error there holds them): compare away from position 0
    keys = [k for k in theirs_index if k[2] > 0 and k in ours_index]
    targets = [k for k in keys if k[0] in ("feature", "logit")]
    assert len([k for k in targets if k[0] == "feature"]) > 20
    A_t, A_o = theirs.adjacency_matrix, ours.adjacency
    compared = 0
    for t in targets:
        for s in keys:
            if s[0] == "logit":
                continue
            want = float(A_t[theirs_index[t], theirs_index[s]])
            got = float(A_o[ours_index[t], ours_index[s]])
            assert got == pytest.approx(want, abs=2e-3, rel=2e-3), (t, s)
            compared += want != 0
    assert compared > 200
