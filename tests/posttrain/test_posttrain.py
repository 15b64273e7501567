"""post-train's parts against independent references: PEFT's merge of LoRA on fused experts against
base + (α/r)·B_e·A_e computed here from the factors; routing drift's two nulls (an unchanged model: 0; a
random router: 1 − K/E); one `error:` line and nothing written for each bad input; a rerun after a
killed point reproduces the uninterrupted run's weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


def test_merge_of_lora_on_some_fused_experts_equals_the_hand_computed_update():
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model
    from deepseemoe.posttrain.lora import apply_lora, expert_targets, merged

    model = tiny_model("olmoe", experts_implementation="eager")
    handle = handle_from_model(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    rank, alpha, chosen = 3, 6.0, [2, 5]
    targets = expert_targets(handle, [1], {1: chosen})
    pm, trainable = apply_lora(model, targets, rank, alpha)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    for _ in range(3):  # B leaves zero on the chosen experts only
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    factors = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    out = merged(pm)
    got = dict(out.named_parameters())
    E = model.config.num_experts
    per_tensor = 0
    for pname in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{pname}"
        # PEFT nests one ParamWrapper per parameter: try every (A, B) pair of the right shape
        As = [v for n, v in factors.items() if "lora_A" in n]
        Bs = [v for n, v in factors.items() if "lora_B" in n]
        W0, W1 = base[key], got[key].detach()
        matched = False
        for A, B in zip(As, Bs, strict=True):
            if A.shape[1] != W0.shape[2] or B.shape[0] != W0.shape[1]:
                continue
            # by hand: expert e uses rows e·r…e·r+r-1 of A and columns j·E + e of B
            delta = torch.stack([B[:, [j * E + e for j in range(rank)]] @ A[e * rank:(e + 1) * rank]
                                 for e in range(E)]) * (alpha / rank)
            if torch.allclose(W1, W0 + delta, atol=1e-6):
                matched = True
        assert matched, key
        changed = [e for e in range(E) if not torch.equal(W1[e], W0[e])]
        assert changed == chosen, (key, changed)
        per_tensor += len(chosen) * rank * (W0.shape[1] + W0.shape[2])
    assert trainable == per_tensor
    for n, w in base.items():
        if "experts" not in n:
            assert torch.equal(got[n], w), n


def test_drift_is_zero_unchanged_and_one_minus_k_over_e_for_a_random_router(tiny_olmoe_dir, corpus_jsonl):
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model
    from deepseemoe.posttrain.measure import compare, snapshot

    handle = load_model(str(tiny_olmoe_dir))
    docs = list(iter_documents(TextSource(str(corpus_jsonl), domain_field="domain"))) * 8
    batches = list(pack_documents(handle.tokenizer, docs, ctx_len=32, batch_size=8, max_tokens=4000))
    before = snapshot(handle, batches)
    same = compare(before, snapshot(handle, batches), "code")
    assert same["drift"] == 0.0 and same["changed"] == 0.0 and same["target_delta_ce"] == 0.0
    drifts = []
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for moe in handle.moe_layers.values():
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g) * 10)
        drifts.append(compare(before, snapshot(handle, batches), "code")["drift"])
    moe = next(iter(handle.moe_layers.values()))
    assert np.mean(drifts) == pytest.approx(1 - moe.top_k / moe.num_experts, abs=0.05)


ARGS = ["--steps", "3", "--seeds", "1", "--ctx-len", "32", "--batch-size", "4", "--train-tokens", "800",
        "--eval-tokens", "600", "--rank", "2"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory, corpus_jsonl):
    root = tmp_path_factory.mktemp("posttrain_texts")
    lines = corpus_jsonl.read_text().splitlines()
    (root / "docs.jsonl").write_text("\n".join(lines * 12) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "en.jsonl").write_text("\n".join(x for x in lines if '"en"' in x) + "\n")
    (root / "short.jsonl").write_text(json.dumps({"text": "def f(): pass", "domain": "code"}) + "\n")
    return root


def _refused(res, out, *words):
    assert res.code == 2, res.err
    assert len(res.error_lines) == 1, res.err
    for w in words:
        assert w in res.error_lines[0], res.error_lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_is_one_error_line_and_nothing_written(cli, tmp_path, tiny_olmoe_dir, texts):
    docs = str(texts / "docs.jsonl")
    out = tmp_path / "out"
    common = [str(tiny_olmoe_dir), "--data", docs, "--eval", docs, "--out", str(out), "--target-domain", "code", *ARGS]
    _refused(cli("post-train", *common, "--strategy", "experts-by-hint"), out, "need a hint", "--hint")
    _refused(cli("post-train", *common, "--strategy", "sideways"), out, "unknown strategy")
    _refused(cli("post-train", *common, "--target-domain", "klingon"), out, "klingon", "not a domain of --eval")
    _refused(cli("post-train", str(tiny_olmoe_dir), "--data", str(texts / "empty.jsonl"), "--eval", docs, "--out",
                 str(out), "--target-domain", "code", *ARGS), out, "is empty")
    _refused(cli("post-train", str(tiny_olmoe_dir), "--data", str(texts / "en.jsonl"), "--eval", docs, "--out",
                 str(out), "--target-domain", "code", *ARGS), out, "no text of domain 'code'")
    _refused(cli("post-train", str(tiny_olmoe_dir), "--data", str(texts / "short.jsonl"), "--eval", docs, "--out",
                 str(out), "--target-domain", "code", *ARGS), out, "fewer than one batch")
    _refused(cli("post-train", "tiny:llama", "--data", docs, "--eval", docs, "--out", str(out),
                 "--target-domain", "code", *ARGS), out, "no MoE layer")
    _refused(cli("post-train", *common, "--hint", "nowhere"), out, "RUN_DIR:DICTIONARY")


def test_a_hint_of_another_model_and_a_budget_of_zero_experts_are_refused(cli, tmp_path, tiny_olmoe_dir, texts):
    from tests.posttrain.planted import documents, model_folder

    other = model_folder(tmp_path / "other")
    train = documents(tmp_path / "train.jsonl", 60, seed=0)
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": str(other), "data": str(train), "domain_field": "domain", "out": str(tmp_path / "dict"),
        "coders": [{"kind": "sae", "layers": [0], "site": "block_in", "activation": "relu", "expansion_factor": 2,
                    "name": "hint"}], "tokens": 1024, "ctx_len": 32, "batch_size": 8,
        "train": {"batch_size": 256, "buffer_size": 512}}))
    assert cli("train", str(tmp_path / "run.yaml")).code == 0
    assert cli("map", str(tmp_path / "dict"), "--dictionary", "hint", "--tokens", "1000").code == 0
    docs = str(texts / "docs.jsonl")
    out = tmp_path / "out"
    res = cli("post-train", str(tiny_olmoe_dir), "--data", docs, "--eval", docs, "--out", str(out), "--target-domain",
              "code", "--hint", f"{tmp_path / 'dict'}:hint", *ARGS)
    _refused(res, out, "trained on", "not on the model being post-trained")
    res = cli("post-train", str(tiny_olmoe_dir), "--data", docs, "--eval", docs, "--out", str(out), "--target-domain",
              "code", "--dense", str(other), *ARGS)
    _refused(res, out, "another tokenizer")
    train_a = documents(tmp_path / "a.jsonl", 60, seed=3)
    # the dictionary knows its model by the weights' checksums: the same model in a moved folder passes the
    # identity check (and is refused further on, for its budget)
    moved = other.rename(tmp_path / "moved")
    res = cli("post-train", str(moved), "--data", str(train_a), "--eval", str(train_a), "--out", str(out),
              "--target-domain", "a", "--hint", f"{tmp_path / 'dict'}:hint", "--experts", "0.05",
              "--strategy", "experts-by-hint", *ARGS)
    _refused(res, out, "rounds to zero experts")


def test_an_old_peft_is_named_with_the_version_needed(monkeypatch):
    import peft

    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.posttrain.lora import require_peft

    monkeypatch.setattr(peft, "__version__", "0.16.0")
    with pytest.raises(DeepSeeMoEError, match=r"PEFT 0\.16\.0 .* needs PEFT ≥ 0\.17\.0"):
        require_peft()


def test_a_rerun_after_a_killed_point_reproduces_it_and_reuses_the_rest(cli, tmp_path, tiny_olmoe_dir, texts):
    docs = str(texts / "docs.jsonl")
    out = tmp_path / "out"
    args = ["post-train", str(tiny_olmoe_dir), "--data", docs, "--eval", docs, "--out", str(out), "--target-domain",
            "code", "--strategy", "all,router-only", *ARGS]
    first = cli(*args)
    assert first.code == 0, first.err
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [r["strategy"] for r in table] == ["all", "router-only"]
    kept = load_file(str(out / "points" / "router-only-seed0" / "model" / "model.safetensors"))
    mtime = (out / "points" / "all-seed0" / "result.json").stat().st_mtime_ns
    # what a kill -9 during the second point leaves: no finished folder, a staging folder beside it
    shutil.move(out / "points" / "router-only-seed0", out / "points" / ".router-only-seed0.abc.staging")
    again = cli(*args)
    assert again.code == 0, again.err
    assert "reused 1 finished point" in again.out
    assert (out / "points" / "all-seed0" / "result.json").stat().st_mtime_ns == mtime
    redone = load_file(str(out / "points" / "router-only-seed0" / "model" / "model.safetensors"))
    for k, v in kept.items():
        assert torch.equal(redone[k], v), k
    weights = out / "points" / "all-seed0" / "model" / "model.safetensors"  # a finished point, damaged since
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    res = cli(*args)
    assert res.code == 2 and "all-seed0" in res.error_lines[0] and "checksum" in res.error_lines[0], res.err
    res = cli("post-train", str(tiny_olmoe_dir), "--data", docs, "--eval", docs, "--out", str(out), "--target-domain",
              "code", "--strategy", "all", *ARGS[:-2], "--rank", "3")
    assert res.code == 2 and "other settings" in res.error_lines[0]


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_trainable_count_is_the_rank_times_each_matrix_in_plus_out_and_the_dense_twin_is_matched(arch):
    """PEFT's own count of trainable parameters (every strategy, two ranks, masked experts excluded)
    equals rank × Σ (in + out) over the adapted matrices; the dense twin's matched rank lands its count
    within half a rank unit of the MoE's `all`."""
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model
    from deepseemoe.posttrain.lora import STRATEGIES, apply_lora, lora_size, strategy_targets
    from deepseemoe.posttrain.study import matched_rank

    for strategy in STRATEGIES:
        for rank in (1, 3):
            handle = handle_from_model(tiny_model(arch, experts_implementation="eager"))
            targets = strategy_targets(handle, strategy, 1, [0, 2])
            size = lora_size(handle.model, targets)
            _, trainable = apply_lora(handle.model, targets, rank, 2.0)
            peft_count = sum(p.numel() for n, p in handle.model.named_parameters() if p.requires_grad)
            assert trainable == rank * size, (strategy, rank)
            if not targets.experts:  # no masked slices: PEFT's count is the trainable count
                assert peft_count == trainable
    moe = handle_from_model(tiny_model(arch, experts_implementation="eager"))
    dense = handle_from_model(tiny_model("llama"))
    r = matched_rank(moe, dense, 4)
    moe_count = apply_lora(moe.model, strategy_targets(moe, "all"), 4, 8.0)[1]
    dense_targets = strategy_targets(dense, "all")
    dense_count = apply_lora(dense.model, dense_targets, r, 8.0)[1]
    assert abs(dense_count - moe_count) <= lora_size(dense.model, dense_targets) / 2


def test_findings_call_a_difference_only_beyond_the_seeds_spread():
    from deepseemoe.posttrain.study import findings

    def row(strategy, ce, ce_sd, **kw):
        return {"strategy": strategy, "seeds": 3, "rank": 4, "target_delta_ce": ce, "target_delta_ce_sd": ce_sd,
                "forgetting": kw.get("f", 0.0), "forgetting_sd": kw.get("f_sd", 0.0), "drift": kw.get("d", 0.0),
                "drift_sd": 0.0, "trainable": 100, "hint_routed_after": 0.5, "other_drift": 0.0,
                "other_drift_sd": 0.0}

    base = {"target_domain": "code", "hint_routed": 0.4}
    # hinted −0.010 ± 0.001 vs random −0.002 ± 0.001: 0.008 apart, spread 0.002 → the hint beats random
    said = " ".join(findings([row("experts-by-hint", -0.010, 0.001), row("random-experts", -0.002, 0.001)], base))
    assert "the hint beats random experts by more than the seeds' spread" in said
    # 0.008 apart, spread 0.010 → not a difference
    said = " ".join(findings([row("experts-by-hint", -0.010, 0.005), row("random-experts", -0.002, 0.005)], base))
    assert "does not beat random experts" in said
    # the MoE forgets +0.10 ± 0.01, the dense twin +0.03 ± 0.01: more, beyond the spread; +0.05 ± 0.03: within
    said = " ".join(findings([row("all", -0.05, 0.01, f=0.10, f_sd=0.01), row("dense-all", -0.05, 0.01, f=0.03,
                                                                                f_sd=0.01)], base))
    assert "The MoE forgets more than its dense twin, beyond the seeds' spread" in said
    said = " ".join(findings([row("all", -0.05, 0.01, f=0.10, f_sd=0.03), row("dense-all", -0.05, 0.01, f=0.05,
                                                                                f_sd=0.03)], base))
    assert "differs by less than the seeds' spread" in said
    # a frozen router that still drifts 0.09 against 0.10 does not keep routing still
    said = " ".join(findings([row("all", -0.05, 0.01, d=0.10), row("frozen-router", -0.05, 0.01, d=0.09)], base))
    assert "does not keep routing still" in said
