"""Causal checks on hand-built cases with known answers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from deepseemoe.causal.checks import (
    LossMeter,
    disable_top,
    drop_slots,
    run_causal_checks,
    spearman,
    token_domains,
    top1_only,
)
from deepseemoe.cli import app
from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents
from deepseemoe.interventions.routing import ablate, exclude, random_routing, route_intervention
from deepseemoe.models.load import load_model


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: a → (1, 2.5, 2.5, 4) minus 1; b = (1, 2, 3, 4)
    ra, rb = torch.tensor([0, 1.5, 1.5, 3]), torch.tensor([0, 1.0, 2, 3])
    expected = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert spearman([5, 7, 7, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_rewrites_by_hand():
    idx = torch.tensor([[3, 1, 0], [2, 0, 1]])
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    _, w1 = top1_only()(None, idx, w, None)
    torch.testing.assert_close(w1, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    _, w2 = disable_top(1)(None, idx, w, None)  # drop the largest, rescale the rest to the total 1.0
    torch.testing.assert_close(w2, torch.tensor([[0, 0.6, 0.4], [0.25, 0, 0.75]]))

    class Layer:
        layer = 0
    _, w3 = drop_slots(0.25, seed=1)(Layer(), torch.zeros(4000, 4, dtype=torch.long), torch.ones(4000, 4), None)
    assert abs(float((w3 == 0).float().mean()) - 0.25) < 0.02


@pytest.fixture(scope="module")
def setup(tiny_olmoe_dir, corpus_jsonl, tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "docs.jsonl"
    path.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 6) + "\n")
    handle = load_model(str(tiny_olmoe_dir))
    batches = list(pack_documents(handle.tokenizer, iter_documents(TextSource(str(path))), ctx_len=32,
                                  batch_size=4, max_tokens=400))
    return handle, batches, path


def test_known_answers_on_a_tiny_olmoe(setup):
    handle, batches, _ = setup
    meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    none = meter.measure()
    assert none["delta_ce"] == 0 and none["kl"] == 0
    # an expert whose down projection is zero outputs 0: ablating it changes nothing...
    experts = handle.moe_layers[1].experts
    saved = experts.down_proj.data[3].clone()
    experts.down_proj.data[3] = 0
    try:
        ablated = meter.__class__(handle, batches, [token_domains(b) for b in batches])  # clean = the edited model
        res = ablated.measure(lambda: route_intervention(handle, {1: ablate([3])}))
        assert res["delta_ce"] == 0 and res["kl"] == 0
        # ...while excluding it lets the router pick another expert, which does change the output
        assert ablated.measure(lambda: route_intervention(handle, {1: exclude([3])}))["kl"] > 0
    finally:
        experts.down_proj.data[3] = saved
    # all experts identical → random routing with the router's weights kept changes nothing
    saved = (experts.gate_up_proj.data.clone(), experts.down_proj.data.clone())
    experts.gate_up_proj.data[:] = saved[0][0]
    experts.down_proj.data[:] = saved[1][0]
    try:
        same = LossMeter(handle, batches, [token_domains(b) for b in batches])
        res = same.measure(lambda: route_intervention(handle, {1: random_routing(0)}))
        assert abs(res["delta_ce"]) < 1e-5 and res["kl"] < 1e-6
    finally:
        experts.gate_up_proj.data, experts.down_proj.data = saved
    # domains: the per-domain ΔCEs average (token-weighted) to the overall ΔCE
    res = meter.measure(lambda: route_intervention(handle, {0: top1_only()}))
    n = {d: sum(int(m[d].sum()) for m in meter.domain_masks if d in m) for d in res["by_domain"]}
    weighted = sum(res["by_domain"][d] * n[d] for d in n) / sum(n.values())
    assert weighted == pytest.approx(res["delta_ce"], rel=1e-5)


def test_run_causal_checks_and_cli(setup, tiny_olmoe_dir, tmp_path):
    handle, batches, path = setup
    res = run_causal_checks(handle, batches[:2], layers=[1], experts=[0, 1, 2], progress=False)
    assert [r["expert"] for r in res["experts"]] == [0, 1, 2]
    assert {r["layer"] for r in res["layers"]} == {1} and len(res["disable_top_r"]) == 1
    loads = [r["load"] for r in res["experts"]]
    assert all(0 <= v <= 1 for v in loads)
    result = CliRunner().invoke(app, ["ablate", str(tiny_olmoe_dir), "--data", str(path), "--out", str(tmp_path / "a"),
                                      "--tokens", "200", "--ctx-len", "32", "--layers", "0", "--experts", "0,1,2,3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert len(doc["experts"]) == 4 and (tmp_path / "a" / "figures" / "ablation_delta_ce.png").exists()
    assert len(doc["observational_vs_causal"]) == 1


def test_packed_predictions_are_labelled_by_the_token_read():
    """Two documents packed into one context: the prediction "last `a` token → BOS of `b`" is
    nobody's, and every other prediction belongs to the document of the token it reads."""
    from deepseemoe.data.tokens import PackedBatch

    # context: BOS a a a BOS b b pad   (doc ids 7 and 9)
    doc = torch.tensor([[7, 7, 7, 7, 9, 9, 9, -1]])
    pos = torch.tensor([[-1, 0, 1, 2, -1, 0, 1, -1]], dtype=torch.int32)
    batch = PackedBatch(torch.zeros(1, 8, dtype=torch.long), (doc >= 0).long(), doc, pos, {7: "a", 9: "b"})
    assert token_domains(batch) == ["a", "a", "a", "", "b", "b", ""]


def test_ablating_an_expert_no_b_token_uses_leaves_domain_b_exactly_unchanged():
    """Planted: attention writes nothing (o_proj = 0), so each prediction depends on its own token
    only; `a` tokens (ids 10–19) route to expert 0 in every layer and `b` tokens (20–29) and BOS
    never do. Ablating expert 0 must leave ΔCE_b exactly 0 on packed a|b contexts."""
    from tests.causal.planted import planted_batch, planted_model

    handle, batch = planted_model(), planted_batch()
    meter = LossMeter(handle, [batch], [token_domains(batch)])
    res = meter.measure(lambda: route_intervention(handle, {la: ablate([0]) for la in handle.moe_layers}))
    assert res["by_domain"]["a"] != 0  # the expert matters to `a`…
    assert res["by_domain"]["b"] == 0.0  # …and to no `b` prediction


def test_observed_expert_load_counts_the_kept_tokens_as_route_does(tiny_olmoe_dir, corpus_jsonl):
    """observe_experts' load is over the kept tokens (no padding, no BOS), as `route` counts them by
    default: checked against the top-k of Hugging Face's own router logits, counted by hand."""
    import numpy as np
    import torch

    from deepseemoe.causal.checks import observe_experts
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model

    handle = load_model(str(tiny_olmoe_dir))
    batches = list(pack_documents(handle.tokenizer, iter_documents(TextSource(str(corpus_jsonl))), ctx_len=32,
                                  batch_size=4, max_tokens=300))
    got = observe_experts(handle, batches)
    counts = {la: np.zeros(m.num_experts) for la, m in handle.moe_layers.items()}
    bos = 0
    with torch.no_grad():
        for b in batches:
            out = handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_router_logits=True)
            keep = (b.attention_mask.bool() & (b.input_ids != handle.tokenizer.bos_token_id)).reshape(-1)
            bos += int((b.input_ids == handle.tokenizer.bos_token_id).sum())
            for la, logits in enumerate(out.router_logits):
                k = handle.moe_layers[la].top_k
                chosen = logits.reshape(-1, logits.shape[-1])[keep].topk(k, -1).indices.reshape(-1)
                np.add.at(counts[la], chosen.numpy(), 1)
    assert bos > 0
    for la, c in counts.items():
        np.testing.assert_allclose(got[la]["load"], c / c.sum())
