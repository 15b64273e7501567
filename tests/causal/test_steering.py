"""Feature ablation/steering through a spliced SAE, against exact expectations."""

from __future__ import annotations

import math

import pytest
import torch

from deepseemoe.capture.core import Site, token_mask
from deepseemoe.causal.steering import FeatureEdit, edit_feature
from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents
from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.models.load import load_model
from deepseemoe.models.routers import router_linear


@pytest.fixture(scope="module")
def setup(tiny_olmoe_dir, corpus_jsonl):
    handle = load_model(str(tiny_olmoe_dir))
    batches = list(pack_documents(handle.tokenizer, iter_documents(TextSource(str(corpus_jsonl))), ctx_len=32,
                                  batch_size=4, max_tokens=200))
    torch.manual_seed(0)
    D = handle.model.config.hidden_size
    sae = build_coder(CoderConfig(d_in=D, n_latents=64, activation="relu"))
    with torch.no_grad():
        sae.W_enc.mul_(3.0)
        sae.input_scale.fill_(0.7)
        sae.target_scale.fill_(0.7)
    return handle, batches, sae.eval()


def test_scale_one_changes_nothing(setup):
    handle, batches, sae = setup
    res = edit_feature(handle, sae, Site("block_in", 1), batches, feature=3, scale=1.0)
    assert res["delta_ce"] == pytest.approx(0.0, abs=1e-7) and res["kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(v["all_tokens"] == 0 for v in res["routing_changed"].values())


def test_ablation_moves_router_logits_by_exactly_the_features_attribution(setup):
    """Router logits under the edit = clean logits − f_i·(W_r·d_i) on tokens where it fired."""
    handle, batches, sae = setup
    moe = handle.moe_layers[1]
    b = batches[0]
    seen = {}
    hook = moe.router.register_forward_hook(lambda m, a, o: seen.__setitem__("logits", o[0] if isinstance(o, tuple)
                                                                              else o))
    hook_in = moe.block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            clean, x = seen["logits"].reshape(-1, moe.num_experts).clone(), seen["x"].reshape(-1, seen["x"].shape[-1])
            edit = FeatureEdit(handle, sae, Site("block_in", 1), feature=5, scale=0.0)
            edit.keep = token_mask(b.input_ids, b.attention_mask, handle.tokenizer.bos_token_id, True)
            with edit:
                handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            edited = seen["logits"].reshape(-1, moe.num_experts)
    finally:
        hook.remove()
        hook_in.remove()
    folded = sae.folded()
    f = folded.encode(x)[:, 5] * edit.keep
    W_r, _ = router_linear(handle, 1)
    expected = clean - f[:, None] * (W_r @ folded.W_dec[5])[None, :]
    assert int((f > 0).sum()) > 0
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)


def test_ablating_a_firing_feature_is_reported(setup):
    handle, batches, sae = setup
    res = edit_feature(handle, sae, Site("block_in", 1), batches, feature=5, scale=0.0)
    assert res["fired_tokens"] > 0 and res["kl"] > 0
    r = res["routing_changed"]["1"]
    assert 0 <= r["all_tokens"] <= 1 and (math.isnan(r["where_fired"]) or r["where_fired"] >= r["all_tokens"])


def test_steer_cli(tmp_path, tiny_olmoe_dir, corpus_jsonl):
    import json

    import yaml
    from typer.testing import CliRunner

    from deepseemoe.cli import app

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 20) + "\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(tmp_path / "run"), "ctx_len": 32,
        "tokens": 512, "coders": [{"kind": "sae", "site": "block_in", "layers": [1], "k": 4, "expansion_factor": 2,
                                   "name": "s"}], "train": {"batch_size": 128, "buffer_size": 256}}))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tmp_path / "run.yaml")], catch_exceptions=False).exit_code == 0
    r = runner.invoke(app, ["steer", str(tmp_path / "run"), "--dictionary", "s", "--feature", "0", "--feature", "1",
                            "--scale", "2", "--tokens", "300"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "run" / "steering" / "s" / "f0-1_x2.json").read_text())
    assert [d["feature"] for d in doc["results"]] == [0, 1] and all(d["scale"] == 2 for d in doc["results"])
    # another scale gets a file of its own: earlier results are never overwritten
    r = runner.invoke(app, ["steer", str(tmp_path / "run"), "--dictionary", "s", "--feature", "0", "--scale", "0",
                            "--tokens", "300"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "run" / "steering" / "s").iterdir()) == ["f0-1_x2.json", "f0_x0.json"]
