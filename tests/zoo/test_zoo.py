"""The tiny recipe trains, reloads like a hub model, and is cached; the twin matches active params."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepseemoe.models.load import load_model
from deepseemoe.zoo.recipes import dense_config, get_recipe, moe_config
from deepseemoe.zoo.train import lr_at, train_zoo


def test_twin_has_the_same_active_feed_forward_parameters():
    r = get_recipe("demo")

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    moe, dense = moe_config(r, Tok), dense_config(r, Tok)
    # by hand: a SwiGLU MLP of width f over D has 3·D·f weights; the MoE activates top_k experts of width f_e
    active_moe = moe.num_experts_per_tok * 3 * moe.hidden_size * moe.intermediate_size
    assert active_moe == 3 * dense.hidden_size * dense.intermediate_size
    assert (moe.hidden_size, moe.num_hidden_layers, moe.num_attention_heads) == \
        (dense.hidden_size, dense.num_hidden_layers, dense.num_attention_heads)


def test_schedule_warms_up_then_decays_to_ten_percent():
    r = get_recipe("demo")
    assert lr_at(0, r) == pytest.approx(r.lr / r.warmup)
    assert lr_at(r.warmup, r) == pytest.approx(r.lr)
    assert lr_at(r.steps, r) == pytest.approx(0.1 * r.lr)


def test_tiny_training_reloads_and_is_cached(zoo):
    models, root = zoo
    log = [json.loads(x) for x in (models.root / "moe.log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]  # it learned something
    tok = AutoTokenizer.from_pretrained(models.moe_dir)
    ids = torch.tensor([tok("def main():\n    return 0")["input_ids"]])
    for folder in (models.moe_dir, models.dense_dir):
        a = AutoModelForCausalLM.from_pretrained(folder).eval()
        b = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    handle = load_model(str(models.moe_dir))
    assert handle.is_moe and handle.tokenizer is not None and len(handle.moe_layers) == 2
    assert not load_model(str(models.dense_dir)).is_moe
    assert set(models.checkpoints) == {1, 3, 12, 30} and all(p.exists() for p in models.checkpoints.values())
    again = train_zoo(root / "corpus", recipe="tiny", cache_dir=root / "cache", progress=False)
    assert again.cached and again.root == models.root


def test_ternary_pair_trains_ternary_and_float_caches_keep_their_keys(zoo):
    """tiny-ternary: the tiny recipe with ternary experts, router and dense MLP (straight-through). The
    saved weights of those tensors hold three values per matrix (checkpoints too); the rest is float."""
    import dataclasses

    from deepseemoe.models.ternary import TERNARY_JSON
    from deepseemoe.zoo.train import cache_key

    models, root = zoo
    tern = train_zoo(root / "corpus", recipe="tiny-ternary", cache_dir=root / "cache", progress=False)
    log = [json.loads(x) for x in (tern.root / "moe.log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    moe = AutoModelForCausalLM.from_pretrained(tern.moe_dir)
    for layer in moe.model.layers:
        for stack in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert all(len(torch.unique(m)) <= 3 for m in stack)
        assert len(torch.unique(layer.mlp.gate.weight)) <= 3
        assert len(torch.unique(layer.self_attn.q_proj.weight)) > 3  # attention stays float
    early = AutoModelForCausalLM.from_pretrained(tern.checkpoints[min(tern.checkpoints)])
    assert all(len(torch.unique(m)) <= 3 for m in early.model.layers[0].mlp.experts.down_proj)
    dense = AutoModelForCausalLM.from_pretrained(tern.dense_dir)
    for layer in dense.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert len(torch.unique(proj.weight)) <= 3
    shares = tern.report["ternary"]
    assert set(shares) == {"moe", "dense"} and all(0 < s["zero_share"] < 1 for s in shares.values())
    assert json.loads((tern.moe_dir / TERNARY_JSON).read_text())["parts"] == ["experts", "router"]
    assert set(tern.report["val_loss"]["moe"]) == set(models.report["val_loss"]["moe"])
    # the float recipe's cache key is what it was before recipes could be ternary
    tiny = get_recipe("tiny")
    old = dataclasses.asdict(tiny)
    del old["ternary"]
    assert cache_key(tiny, root / "corpus") != cache_key(get_recipe("tiny-ternary"), root / "corpus")
    assert models.root.name == cache_key(tiny, root / "corpus")


def test_zoo_list_shows_cached_models_with_their_folders(cli, tmp_path):
    entry = tmp_path / "zoo" / "demo-0123"
    for kind in ("moe", "dense"):
        (entry / kind).mkdir(parents=True)
        (entry / kind / "config.json").write_text("{}")
    (entry / "report.json").write_text("{}")
    (tmp_path / "zoo" / "tiny-4567" / "moe").mkdir(parents=True)  # interrupted: no report.json
    r = cli("zoo", "list", "--cache-dir", tmp_path)
    assert r.code == 0, r.err
    assert str(entry / "moe") in r.out and str(entry / "dense") in r.out
    assert "complete" in r.out and "incomplete" in r.out
    empty = cli("zoo", "list", "--cache-dir", tmp_path / "nothing")
    assert empty.code == 0 and "no models" in empty.out
