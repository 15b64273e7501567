"""`deepseemoe train`: every kind × activation trains from one config on a tiny OLMoE folder, the
files load back, exports appear, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from deepseemoe.cli import app
from deepseemoe.dictionaries.formats import load_native

KINDS = {"sae": [0], "transcoder": [1], "skip_transcoder": [0], "router_transcoder": [1], "crosscoder": [0, 1],
         "clt": "all"}
ACTIVATIONS = ["topk", "batchtopk", "jumprelu", "relu"]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, corpus_jsonl):
    path = tmp_path_factory.mktemp("train_corpus") / "docs.jsonl"
    lines = corpus_jsonl.read_text().splitlines()
    path.write_text("\n".join(lines * 40) + "\n")
    return path


def run(args):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_kind_and_activation_trains_from_one_config(tmp_path, tiny_olmoe_dir, big_corpus):
    coders = [{"kind": kind, "layers": layers, "activation": act, "k": 4, "expansion_factor": 2,
               "name": f"{kind}_{act}"} for kind, layers in KINDS.items() for act in ACTIVATIONS]
    config = {"model": str(tiny_olmoe_dir), "corpus": str(big_corpus), "out": str(tmp_path / "run"), "coders": coders,
              "tokens": 3072, "ctx_len": 32, "batch_size": 8, "checkpoint_every": 4,
              "formats": ["saelens", "sparsify", "circuit_tracer"],
              "train": {"batch_size": 256, "buffer_size": 512, "lr": 3e-3, "sparsity_coef": 1e-3}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    output = run(["train", str(tmp_path / "run.yaml")])
    assert "trained 24 coder(s)" in output
    out = tmp_path / "run"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 24 * 12
    for c in coders:
        curve = [m["fvu"] for m in metrics if m["coder"] == c["name"]]
        assert len(curve) == 12 and all(v == v for v in curve), c["name"]  # no NaN
        coder, meta = load_native(out / "dictionaries" / c["name"])
        assert coder.cfg.kind == c["kind"].replace("router_transcoder", "transcoder") and meta["steps"] == 12
    clt, meta = load_native(out / "dictionaries" / "clt_relu")
    assert clt.cfg.n_sites == 2 and meta["source"] == [["block_in", 0], ["block_in", 1]]
    # exports: SAELens for what it can express, sparsify for single-site TopK, circuit-tracer CLTs
    assert (out / "exports" / "saelens" / "router_transcoder_jumprelu" / "cfg.json").exists()
    assert not (out / "exports" / "saelens" / "transcoder_topk").exists()  # SAELens has no TopK transcoder
    assert (out / "exports" / "sparsify" / "layers.0" / "sae.safetensors").exists()
    assert (out / "exports" / "circuit_tracer" / "clt_batchtopk" / "W_dec_1.safetensors").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["tokens"] == 3072


def test_resume_from_the_cli_matches_an_uninterrupted_run(tmp_path, tiny_olmoe_dir, big_corpus):
    base = ["train", "--model", str(tiny_olmoe_dir), "--data", str(big_corpus), "--kind", "skip_transcoder",
            "--layers", "1", "--k", "4", "--expansion-factor", "2"]

    def cfg(out, tokens):
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump({
            "coders": [{"kind": "skip_transcoder", "layers": [1], "k": 4, "expansion_factor": 2}],
            "ctx_len": 32, "checkpoint_every": 2, "train": {"batch_size": 128, "buffer_size": 256, "lr": 3e-3}}))
        return [str(tmp_path / f"{out}.yaml"), "--model", str(tiny_olmoe_dir), "--data", str(big_corpus),
                "--out", str(tmp_path / out), "--tokens", str(tokens)]

    run(["train", *cfg("straight", 1280)])
    run(["train", *cfg("split", 640)])  # "killed" after 5 steps, its checkpoint on disk
    run(["train", *cfg("split", 1280), "--resume"])
    a, _ = load_native(tmp_path / "straight" / "dictionaries" / "skip_transcoder_1")
    b, _ = load_native(tmp_path / "split" / "dictionaries" / "skip_transcoder_1")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "straight")])
    assert result.exit_code != 0 and "--resume" in str(result.exception or result.output)


def test_evaluate_reports_splice_metrics_checked_by_hand(tmp_path, tiny_olmoe_dir, big_corpus):
    """Two hand-made residual SAEs whose splice has a known answer: one that reconstructs exactly
    (latents ±x through ReLU, decoded back) gives FVU 0, ΔCE 0, KL 0 and routing preserved 1; one
    with a zero decoder *is* the zero ablation, so its loss recovered is 0."""
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.formats import save_native
    from deepseemoe.models.load import load_model

    D = load_model(str(tiny_olmoe_dir)).model.config.hidden_size
    out = tmp_path / "run"
    config = {"model": str(tiny_olmoe_dir), "corpus": str(big_corpus), "out": str(out), "ctx_len": 32,
              "coders": [{"kind": "sae", "layers": [0]}]}
    out.mkdir()
    from deepseemoe.runs.dictionary import DictionaryRun

    DictionaryRun(out).save_config(config)
    meta = {"kind": "sae", "layers": [0], "source": [["resid_out", 0]], "target": [["resid_out", 0]]}
    # identity: ReLU SAE with latents ±x (2D latents), decoder maps them back
    ident = build_coder(CoderConfig(d_in=D, n_latents=2 * D, activation="relu"))
    zero = build_coder(CoderConfig(d_in=D, n_latents=2 * D, activation="relu"))
    with torch.no_grad():
        eye = torch.eye(D)
        for c in (ident, zero):
            c.b_dec.zero_()
            c.b_enc.zero_()
            c.W_enc.copy_(torch.cat([eye, -eye], 1))
        ident.W_dec.copy_(torch.cat([eye, -eye], 0))
        zero.W_dec.zero_()
    save_native(ident, out / "dictionaries" / "identity", meta=meta)
    save_native(zero, out / "dictionaries" / "zero", meta=meta)
    run(["evaluate", str(out), "--tokens", "600"])
    doc = json.loads((out / "evaluation.json").read_text())
    i, z = doc["coders"]["identity"], doc["coders"]["zero"]
    assert i["fvu"] < 1e-6 and abs(i["delta_ce"]) < 1e-5 and i["kl"] < 1e-6 and i["routing_preserved"] == 1.0
    assert abs(z["loss_recovered"]) < 1e-6 and z["ce_spliced"] == z["ce_zero"] and z["fvu"] > 0.99
    assert 0 <= z["routing_preserved"] < 1


def test_evaluate_after_training_covers_every_spliceable_kind(tmp_path, tiny_olmoe_dir, big_corpus):
    coders = [{"kind": kind, "layers": layers, "activation": "topk", "k": 4, "expansion_factor": 2}
              for kind, layers in KINDS.items()]
    config = {"model": str(tiny_olmoe_dir), "corpus": str(big_corpus), "out": str(tmp_path / "run"),
              "coders": coders, "tokens": 2048, "ctx_len": 32, "domain_field": "domain",
              "train": {"batch_size": 256, "buffer_size": 512, "lr": 3e-3}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run(["train", str(tmp_path / "run.yaml")])
    run(["evaluate", str(tmp_path / "run"), "--tokens", "600"])
    doc = json.loads((tmp_path / "run" / "evaluation.json").read_text())["coders"]
    for name in ("sae_0", "transcoder_1", "skip_transcoder_0", "clt_all"):
        r = doc[name]
        assert r["ce_zero"] >= 0 and r["kl"] >= 0 and r["l0"] <= 4 * len(r["fvu_per_site"]) + 1e-9, name
    assert 0 <= doc["router_transcoder_1"]["routing_preserved"] <= 1
    assert "delta_ce" not in doc["crosscoder_0_1"]
    assert set(doc["transcoder_1"]["per_expert_fvu"]) <= {str(e) for e in range(64)}
    # sparse probing of the text's domains, for every kind, beside an untrained dictionary of its shape
    for name, r in doc.items():
        sp = r["sparse_probing"]
        assert sp["labels"] == ["code", "de", "en"] and sp["documents"] >= 6, name
        assert all(0 <= v <= 1 for k in sp["k"].values() for v in k.values()) and set(sp["k"]["1"]) == {
            "latents", "raw_topk", "random"}, name
    # feature absorption for the SAE (it reconstructs what it reads), beside a random dictionary; not for the others
    assert set(doc["sae_0"]["absorption"]) == {"trained", "random"}
    assert "absorption" not in doc["transcoder_1"] and "absorption" not in doc["crosscoder_0_1"]
    # expert alignment for every kind whose input feeds an MoE layer, beside both baselines
    for name, r in doc.items():
        al = r["expert_alignment"]
        assert al["layer"] in (0, 1) and al["top_k"] == 2 and al["uniform_concentration"] == 2 / al["num_experts"]
        for kind in ("trained", "random", "shuffled"):
            if al[kind]["live"]:
                assert 0 <= al[kind]["aligned_share"] <= 1 and al["uniform_concentration"] <= \
                    al[kind]["mean_concentration"] <= 1, (name, kind)
    # cross-layer kinds: how many layers each live feature writes to, counted over the live features
    for name in ("crosscoder_0_1", "clt_all"):
        sp = doc[name]["layer_spread"]
        assert sum(sp["histogram"].values()) == sp["features"] == round((1 - doc[name]["dead"]) * doc[name]["n_latents"])
    assert len(doc["clt_all"]["layer_spread"]["share_by_offset"]) == 2 and "layer_spread" not in doc["sae_0"]


def test_latent_cache_loads_in_delphi(tmp_path, tiny_olmoe_dir, big_corpus):
    """delphi's own TensorBuffer reads our splits; every (context, position, latent, value) equals
    the coder's encoding of the block input captured independently with a forward hook."""
    from delphi.latents.loader import TensorBuffer

    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model

    config = {"model": str(tiny_olmoe_dir), "corpus": str(big_corpus), "out": str(tmp_path / "run"), "ctx_len": 32,
              "tokens": 512, "coders": [{"kind": "transcoder", "layers": [1], "k": 4, "expansion_factor": 2,
                                         "name": "tc"}], "train": {"batch_size": 128, "buffer_size": 256}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run(["train", str(tmp_path / "run.yaml")])
    run(["latents", str(tmp_path / "run"), "--tokens", "300", "--n-splits", "3", "--batch-size", "4"])
    folder = tmp_path / "run" / "latents" / "tc"
    locs, acts = [], []
    files = sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
    assert len(files) == 3
    for f in files:
        loc, act, tokens = TensorBuffer(str(f), "tc").load()
        locs.append(loc)
        acts.append(act)
    locs, acts = torch.cat(locs), torch.cat(acts)

    coder, _ = load_native(tmp_path / "run" / "dictionaries" / "tc")
    handle = load_model(str(tiny_olmoe_dir))
    batches = list(pack_documents(handle.tokenizer, iter_documents(TextSource(str(big_corpus))), ctx_len=32,
                                  batch_size=4, max_tokens=300))
    ids = torch.cat([b.input_ids for b in batches])
    assert torch.equal(tokens, ids)
    seen = []
    hook = handle.moe_layers[1].block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    hook.remove()
    x = torch.cat(seen)  # [contexts, S, D]
    with torch.no_grad():
        expected = coder.encode(x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1], -1)
    real = torch.cat([b.attention_mask for b in batches]).bool() & (ids != handle.tokenizer.bos_token_id)
    expected = expected * real[..., None]
    got = torch.zeros_like(expected)
    got[locs[:, 0], locs[:, 1], locs[:, 2]] = acts.float()
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)  # delphi stores float16
    assert int((expected > 0).sum()) == len(acts)


def test_activation_cache_trains_the_same_coder_without_the_model(tmp_path, tiny_olmoe_dir, big_corpus):
    """Run 1 captures while training; run 2, with the model's weights replaced by noise, reads the
    cache and ends with identical weights; a damaged shard and a cache of other settings are refused."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_olmoe_dir, model)
    cache = tmp_path / "acts"

    def cfg(out, **extra):
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump({
            "model": str(model), "corpus": str(big_corpus), "out": str(tmp_path / out), "ctx_len": 32,
            "tokens": 1024, "activation_cache": str(cache), "coders": [
                {"kind": "clt", "layers": "all", "k": 4, "expansion_factor": 2, "name": "clt"},
                {"kind": "sae", "layers": [1], "k": 4, "expansion_factor": 2, "name": "sae"}],
            "train": {"batch_size": 128, "buffer_size": 256, "lr": 3e-3}, **extra}))
        return str(tmp_path / f"{out}.yaml")

    run(["train", cfg("first")])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and sum(s["tokens"] for s in manifest["shards"]) >= 1024
    # other weights: only the cache can reproduce run 1's activations
    from safetensors.torch import load_file, save_file

    for f in model.glob("*.safetensors"):
        save_file({k: torch.randn_like(v) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    run(["train", cfg("third")])
    for name in ("clt", "sae"):
        a, _ = load_native(tmp_path / "first" / "dictionaries" / name)
        b, _ = load_native(tmp_path / "third" / "dictionaries" / name)
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), (name, k)
    result = CliRunner().invoke(app, ["train", cfg("fourth", ctx_len=16)])
    assert result.exit_code != 0 and "other settings (ctx_len)" in str(result.exception)
    shard = cache / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    result = CliRunner().invoke(app, ["train", cfg("fifth")])
    assert result.exit_code != 0 and "checksum" in str(result.exception)


def test_ternary_coder_straight_through_and_saved_ternary(tmp_path, tiny_olmoe_dir, big_corpus):
    """`--ternary both`: forward and backward see W_q (one absmean scale per latent), the optimizer
    steps the float weights underneath, and the saved coder holds the ternary weights."""
    from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder

    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=8, n_latents=16, k=3, ternary="both"))
    float_enc, float_dec = coder.W_enc.detach().clone(), coder.W_dec.detach().clone()
    x = torch.randn(32, 8)
    with coder.ternary_weights():
        for w, f, over in ((coder.W_enc, float_enc, 0), (coder.W_dec, float_dec, 1)):
            s = f.abs().mean(over, keepdim=True)  # one scale per latent: W_enc's columns, W_dec's rows
            torch.testing.assert_close(w, torch.clamp(torch.round(f / s), -1, 1) * s)
        loss = (coder(x).out - x).pow(2).sum()
        loss.backward()
        ternary_state = {k: v.detach().clone() for k, v in coder.state_dict().items()}
    assert torch.equal(coder.W_enc, float_enc) and torch.equal(coder.W_dec, float_dec)  # float again
    # the gradient is the one a float coder holding W_q gets (straight through)
    same = SparseCoder(CoderConfig(d_in=8, n_latents=16, k=3))
    same.load_state_dict(ternary_state)
    (same(x).out - x).pow(2).sum().backward()
    torch.testing.assert_close(coder.W_enc.grad, same.W_enc.grad)
    torch.testing.assert_close(coder.W_dec.grad, same.W_dec.grad)

    out = tmp_path / "tern"
    run(["train", "--model", str(tiny_olmoe_dir), "--data", str(big_corpus), "--kind", "sae", "--layers", "1",
         "--k", "4", "--expansion-factor", "2", "--ternary", "both", "--tokens", "1280", "--ctx-len", "32",
         "--out", str(out)])
    saved, _ = load_native(out / "dictionaries" / "sae_1")
    assert saved.cfg.ternary == "both"
    assert all(len(torch.unique(col)) <= 3 for col in saved.W_enc.T)
    assert all(len(torch.unique(row)) <= 3 for row in saved.W_dec)
    metrics = json.loads((out / "dictionaries" / "sae_1" / "config.json").read_text())["meta"]["final"]
    assert 0 < metrics["fvu"] < 2
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_olmoe_dir), "--data", str(big_corpus), "--kind",
                                      "clt", "--layers", "all", "--ternary", "both", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "cross-layer" in str(result.exception or result.output)
