"""Ternary weights (BitNet b1.58's absmean rule): by hand, on a tiny MoE and its dense twin, through
the straight-through estimator, and through `deepseemoe ternarize`."""

from __future__ import annotations

import copy
import json

import pytest
import torch


def test_absmean_by_hand():
    from deepseemoe.models.ternary import ternarize

    w = torch.tensor([[0.5, -1.5, 0.1], [2.0, 0.0, -0.2]])
    # per tensor: s = 4.3 / 6; W/s = [[.70, −2.09, .14], [2.79, 0, −.28]] → round, clip
    trits, s = ternarize(w, in_dim=1, per="tensor")
    assert float(s.squeeze()) == pytest.approx(4.3 / 6)
    assert trits.tolist() == [[1, -1, 0], [1, 0, 0]]
    # per row: s = 2.1/3 and 2.2/3; W/s = [[.71, −2.14, .14], [2.73, 0, −.27]]
    trits, s = ternarize(w, in_dim=1, per="row")
    assert s.squeeze().tolist() == pytest.approx([0.7, 2.2 / 3])
    assert trits.tolist() == [[1, -1, 0], [1, 0, 0]]
    # a stack of matrices (fused experts): one scale per matrix
    stack = torch.stack([w, 10 * w])
    trits, s = ternarize(stack, in_dim=2, per="tensor", stacked=True)
    assert s.squeeze().tolist() == pytest.approx([4.3 / 6, 43 / 6])
    assert trits.tolist() == [[[1, -1, 0], [1, 0, 0]]] * 2
    # an all-zero matrix stays zero (the scale has a floor)
    assert ternarize(torch.zeros(2, 2), in_dim=1)[0].abs().sum() == 0


def _tiny_moe():
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    return handle_from_model(tiny_model("olmoe", vocab_size=64))


@pytest.mark.parametrize("per", ["tensor", "row"])
def test_post_hoc_ternarisation_of_experts_and_router(per):
    from deepseemoe.models.ternary import ternarize_model

    handle = _tiny_moe()
    before = {n: p.detach().clone() for n, p in handle.model.named_parameters()}
    report = ternarize_model(handle, ("experts", "router"), per)
    changed = {n for n, p in handle.model.named_parameters() if not torch.equal(p, before[n])}
    names = {t.name for t in report}
    assert names == changed  # attention, embeddings, norms and the head stay as they were
    assert {n.rsplit(".", 1)[-1] for n in names} == {"gate_up_proj", "down_proj", "weight"}
    for name in names:
        w, old = dict(handle.model.named_parameters())[name], before[name]
        mats = zip(w, old, strict=True) if w.dim() == 3 else [(w, old)]
        for m, o in mats:  # OLMoE stores [out, in] per expert: the output rows are dim 0 of each matrix
            scale = o.abs().mean() if per == "tensor" else o.abs().mean(1, keepdim=True)
            expected = torch.clamp(torch.round(o / scale), -1, 1) * scale
            torch.testing.assert_close(m, expected.expand_as(m), rtol=1e-6, atol=1e-7)
    zero = sum(t.zero_share * torch.Size(t.shape).numel() for t in report) / sum(
        torch.Size(t.shape).numel() for t in report)
    assert 0.2 < zero < 0.45  # Gaussian weights: P(|W| < 0.5 E|W|) ≈ 0.31


def test_straight_through_training_matches_the_ternary_model_and_passes_gradients():
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.ternary import bake, ternarize_model, train_ternary

    handle = _tiny_moe()
    reference = handle_from_model(copy.deepcopy(handle.model))
    ternarize_model(reference, ("experts", "router"))
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = train_ternary(handle, ("experts", "router"))
    handle.model.train()
    reference.model.train()
    loss = handle.model(input_ids=ids, labels=ids).loss
    ref_loss = reference.model(input_ids=ids, labels=ids).loss
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-6)  # forward: the ternary weights
    loss.backward()
    ref_loss.backward()
    # backward: the float weights get the gradient taken at the ternary weights (straight through)
    ref_params = dict(reference.model.named_parameters())
    for t in targets:
        original = t.module.parametrizations[t.attr].original
        ref = ref_params[t.name]
        assert original.grad is not None and original.grad.abs().sum() > 0
        torch.testing.assert_close(original.grad, ref.grad, rtol=1e-5, atol=1e-8)
    report = bake(targets)
    names = dict(handle.model.named_parameters())
    assert set(names) == set(ref_params)  # plain parameters again, the names Hugging Face saves
    for t in report:
        torch.testing.assert_close(names[t.name], ref_params[t.name])


def test_ternarize_cli(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ternary"
    r = cli("ternarize", tiny_olmoe_dir, "--out", out, "--data", corpus_jsonl, "--ctx-len", "32")
    assert r.code == 0, r.err
    result = json.loads((out / "ternary.json").read_text())
    assert result["parts"] == ["experts", "router"] and result["per"] == "tensor"
    assert set(result["loss"]) == {"all", "code", "de", "en"}
    assert all(v["float"] > 0 and v["ternary"] > 0 for v in result["loss"].values())
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:  # three values per expert matrix, once loaded back
        for m in layer.mlp.experts.down_proj:
            assert len(torch.unique(m)) <= 3
        assert len(torch.unique(layer.mlp.gate.weight)) <= 3
    # bad input: one error line, exit 2, nothing written
    for args, words in [(["--per", "col"], "--per"), (["--parts", "heads"], "--parts"),
                        (["--parts", "mlp"], "no tensors of the parts mlp")]:
        r = cli("ternarize", tiny_olmoe_dir, "--out", tmp_path / "bad", *args)
        assert r.code == 2 and len(r.error_lines) == 1 and words in r.error_lines[0], (args, r.err)
        assert not (tmp_path / "bad").exists()
    assert cli("ternarize", tiny_olmoe_dir, "--out", out).code == 2  # not empty: never overwritten
