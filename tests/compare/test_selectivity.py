"""MoE vs dense: the selectivity metric by hand, unit activity against independent hooks, and
`deepseemoe compare` end to end on a tiny MoE / dense pair."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepseemoe.cli import app
from deepseemoe.compare.selectivity import domain_classes, selectivity, unit_selectivity
from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents
from deepseemoe.models.load import load_model
from tests.conftest import build_tokenizer


def test_selectivity_by_hand():
    mass = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [3.0, 3.0, 0.0]])
    counts = np.array([2.0, 2.0, 2.0])
    s = selectivity(mass, counts)
    assert s[0] == pytest.approx(1.0) and s[1] == pytest.approx(0.0) and np.isnan(s[2])
    assert s[3] == pytest.approx(1 - np.log(2) / np.log(3))
    # per-class means, not sums: a class with twice the tokens and twice the mass is "equal"
    assert selectivity(np.array([[4.0, 2.0]]), np.array([2.0, 1.0]))[0] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_olmoe_dir, corpus_jsonl):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = build_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    data = tmp_path_factory.mktemp("pair_data") / "docs.jsonl"
    data.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 10) + "\n")
    return tiny_olmoe_dir, folder, data


def test_unit_activity_matches_independent_hooks(pair):
    moe_dir, _, data = pair
    h = load_model(str(moe_dir))
    batches = list(pack_documents(h.tokenizer, iter_documents(TextSource(str(data), domain_field="domain")),
                                  ctx_len=32, batch_size=4, max_tokens=300))
    names, class_of = domain_classes(batches)
    sel = unit_selectivity(h, batches, class_of, len(names))
    # reference: routing weights and o_proj inputs read by hooks written here
    E = h.moe_layers[1].num_experts
    ref_expert = np.zeros((E, len(names)))
    ref_head = np.zeros((4, len(names)))
    for b in batches:
        keep = (b.attention_mask.reshape(-1) > 0) & (b.input_ids.reshape(-1) != h.tokenizer.bos_token_id)
        cls = class_of(b)[keep]
        got = {}
        hooks = [h.moe_layers[1].experts.register_forward_pre_hook(
            lambda m, a, k, got=got: got.update(idx=a[1], w=a[2]), with_kwargs=True),
            h.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a, got=got: got.update(o=a[0]))]
        with torch.no_grad():
            h.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        for hook in hooks:
            hook.remove()
        idx, w = got["idx"][keep], got["w"][keep]
        for t in range(len(idx)):
            for j in range(idx.shape[1]):
                ref_expert[int(idx[t, j]), int(cls[t])] += float(w[t, j])
        o = got["o"].reshape(-1, got["o"].shape[-1])[keep].view(-1, 4, 16).norm(dim=-1)
        for t in range(len(o)):
            ref_head[:, int(cls[t])] += o[t].double().numpy()
    np.testing.assert_allclose(sel["units"]["expert"]["mass"][1], ref_expert, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sel["units"]["attention_head"]["mass"][0], ref_head, rtol=1e-5, atol=1e-6)
    neurons = sel["units"]["expert_neuron"]["mass"][1]
    per_expert = h.moe_layers[1].experts.gate_up_proj.shape[1] // 2  # [E, 2·intermediate, hidden]
    assert neurons.shape == (E * per_expert, len(names))
    # an expert's neurons are active exactly on the classes whose tokens were routed to it
    active = neurons.reshape(E, per_expert, -1).sum(1) > 0
    np.testing.assert_array_equal(active, ref_expert > 0)


def test_compare_cli_on_a_tiny_pair(pair, tmp_path):
    moe_dir, dense_dir, data = pair
    r = CliRunner().invoke(app, ["compare", str(moe_dir), str(dense_dir), "--data", str(data), "--out",
                                 str(tmp_path / "cmp"), "--tokens", "400", "--ctx-len", "32", "--sae-k", "4,8",
                                 "--sae-tokens", "1024", "--expansion-factor", "2", "--max-units", "4"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(doc["moe"]["domain_selectivity"]) == {"expert", "expert_neuron", "attention_head"}
    assert set(doc["dense"]["domain_selectivity"]) == {"mlp_neuron", "attention_head"}
    assert len(doc["moe"]["ablation"]["expert"]) == 4 and "mlp_neuron_block" in doc["dense"]["ablation"]
    assert {u["neurons"] for u in doc["dense"]["ablation"]["mlp_random_block"]} == \
        {u["neurons"] for u in doc["dense"]["ablation"]["mlp_neuron_block"]}
    assert [row["k"] for row in doc["sae_frontier"]["rows"]["dense"]] == [4, 8]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| measure | MoE | dense |" in md and "SAE k=8" in md
    # the MoE's block-input SAE at the largest k and its feature map; the dense model has no experts
    block = doc["block_features"]
    assert set(block["rows"]) == {"moe"} and block["k"] == 8 and block["site"] == "block_in"
    pairs = duckdb.sql(f"SELECT feature, max(lift) AS top FROM read_parquet("
                       f"'{tmp_path}/cmp/block_sae_moe/maps/block_in/feature_experts.parquet') GROUP BY feature"
                       ).fetchall()
    assert block["rows"]["moe"]["top_lift_median"] == pytest.approx(float(np.median([t for _, t in pairs])))
    assert 0 <= block["rows"]["moe"]["routing_prediction"]["features"] <= 1
    assert "block-input SAE (layer 1, ×2, k=8): routing recall@k from features" in md


def test_ablation_gap_by_hand():
    from deepseemoe.compare.selectivity import _gap, _preferred

    res = {"by_domain": {"code": 0.30, "en": 0.10, "de": 0.05}}
    g = _gap(res, "code")
    assert g["delta_ce_others"] == pytest.approx(0.075) and g["gap"] == pytest.approx(0.225)
    # preferred = highest mean activity per token, not highest total
    assert _preferred(np.array([10.0, 6.0]), np.array([10.0, 2.0])) == 1


def test_units_are_chosen_on_one_half_and_scored_on_the_other(pair, monkeypatch):
    """What picks the ablated units (and the dense model's selected neuron blocks) never sees the
    tokens their ΔCE is measured on; the descriptive selectivity still covers both halves."""
    import deepseemoe.compare.selectivity as cmp

    moe_dir, dense_dir, data = pair
    seen: dict[str, list] = {"selected": [], "scored": []}
    real_sel, real_abl = cmp.unit_selectivity, cmp.ablation_selectivity

    def spy_sel(h, batches, class_of, n, expert_neurons=True, **kw):
        seen["selected"].append({id(b) for b in batches})
        return real_sel(h, batches, class_of, n, expert_neurons, **kw)

    def spy_abl(h, batches, domains, sel, max_units, **kw):
        seen["scored"].append({id(b) for b in batches})
        return real_abl(h, batches, domains, sel, max_units, **kw)

    monkeypatch.setattr(cmp, "unit_selectivity", spy_sel)
    monkeypatch.setattr(cmp, "ablation_selectivity", spy_abl)
    moe, dense = load_model(str(moe_dir)), load_model(str(dense_dir))

    def batches(h):
        return list(pack_documents(h.tokenizer, iter_documents(TextSource(str(data))), ctx_len=32, batch_size=2,
                                   max_tokens=300))
    bm, bd = batches(moe), batches(dense)
    res = cmp.compare_models(moe, dense, bm, bd, max_units_per_kind=2)
    # per model: selection half, evaluation half, token classes over all
    for side, (sel_ids, held_ids, _), scored in zip(("moe", "dense"), (seen["selected"][:3], seen["selected"][3:]),
                                                    seen["scored"], strict=True):
        assert sel_ids and scored and not (sel_ids & scored) and held_ids == scored
        split = res[side]["ablation_split"]
        total = sum(int(b.keep.sum()) for b in (bm if side == "moe" else bd))
        assert split["select_tokens"] + split["evaluate_tokens"] == total and split["select_tokens"] > 0
    # the descriptive selectivity over both halves equals one pass over all the tokens
    monkeypatch.setattr(cmp, "unit_selectivity", real_sel)
    names, by_domain = domain_classes(bm)
    whole = cmp.summarize_selectivity(real_sel(moe, bm, by_domain, len(names)))
    for kind, row in whole.items():
        for key, v in row.items():
            assert res["moe"]["domain_selectivity"][kind][key] == pytest.approx(v, rel=1e-9)


def test_split_halves_of_a_single_batch():
    from deepseemoe.compare.selectivity import split_halves
    from deepseemoe.data.tokens import PackedBatch
    from deepseemoe.errors import DeepSeeMoEError

    z = torch.zeros(4, 3, dtype=torch.long)
    a, b = split_halves([PackedBatch(z, z + 1, z, z.int(), {})])
    assert a[0].input_ids.shape[0] == 2 and b[0].input_ids.shape[0] == 2
    with pytest.raises(DeepSeeMoEError, match="too few held-out contexts"):
        split_halves([PackedBatch(z[:1], z[:1], z[:1], z[:1].int(), {})])


def test_compare_cli_with_experts_trained_separately(pair, tmp_path_factory, tmp_path, cli):
    """A third model (an MoE naming each expert's training domain, as the zoo's FlexOlmo-style
    model does): its column, routing by domain with the declared experts, and domain removal."""
    from deepseemoe.models.tiny import tiny_model

    moe_dir, dense_dir, data = pair
    folder = tmp_path_factory.mktemp("tiny_flex")
    tok = build_tokenizer(folder)
    names = ["public", "code", "de", "en"]
    tiny_model("flex_olmo", vocab_size=len(tok), num_experts=4, num_experts_per_tok=2, expert_names=names,
               bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(folder)
    r = CliRunner().invoke(app, ["compare", str(moe_dir), str(dense_dir), "--separate", str(folder), "--data",
                                 str(data), "--out", str(tmp_path / "cmp"), "--tokens", "400", "--ctx-len", "32",
                                 "--sae-tokens", "0", "--max-units", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert doc["separate"]["expert_names"] == names and doc["moe"]["expert_names"] is None
    assert "routing" not in doc["dense"]
    for side in ("moe", "separate"):
        mean = doc[side]["routing"]["mean"]
        assert 0 <= mean["nmi_all_slots"] <= 1 and 0 <= mean["own_share_mean"] <= 1
    # one declared removal per domain, each removing the expert trained on it
    declared = [row for row in doc["separate"]["domain_removal"]["rows"] if row["removed"] == "declared"]
    assert sorted(row["domain"] for row in declared) == ["code", "de", "en"]
    assert "declared_share_mean" in doc["separate"]["routing"]["mean"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| measure | MoE (trained together) | dense | MoE (experts trained separately) |" not in md
    assert "| measure | MoE (trained together) | MoE (experts trained separately) | dense |" in md
    assert "removing a domain's experts — the expert trained on it" in md

    bad = cli("compare", moe_dir, dense_dir, "--separate", dense_dir, "--data", data, "--out", tmp_path / "bad",
              "--sae-tokens", "0")
    assert bad.code == 2 and len(bad.error_lines) == 1 and bad.error_lines[0].startswith("error: --separate")
    assert not (tmp_path / "bad").exists()
