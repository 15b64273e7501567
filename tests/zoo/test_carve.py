"""`deepseemoe zoo carve`: a dense Llama carved into a Qwen2-MoE that plain transformers loads.

References, none of them the carve's own code: the dense model's logits (all experts on, router
zeroed: the carve must compute the dense model), and a hand computation of the MoE block from the
*dense* model's weights and the neuron groups the carve reports (softmax, top-k, weight E·p, Σ
routed + shared)."""

from __future__ import annotations

import json

import pytest
import torch

LAYERS = 3
F, E_ALL = 128, 8  # feed-forward width; equal parts (1 shared + 7 routed of 16 neurons)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    folder = tmp_path_factory.mktemp("dense")
    tok = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=F, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that neurons differ in how much they carry
        for layer in model.model.layers:
            for p in (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight):
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from deepseemoe.data.demo_corpus import build_corpus

    root = tmp_path_factory.mktemp("carve-corpus")
    build_corpus(root, max_bytes_per_domain=20_000)
    return root


def carve(cli, dense_dir, corpus, out, *extra):
    return cli("zoo", "carve", "--model", dense_dir, "--data", corpus, "--out", out, "--experts", str(E_ALL),
               "--shared", "1", "--top-k", "3", "--calibration-tokens", "1500", "--eval-tokens", "600",
               "--ctx-len", "64", *extra)


@pytest.fixture(scope="module")
def carved(dense_dir, corpus, tmp_path_factory):
    from typer.testing import CliRunner

    from deepseemoe.cli import app

    out = tmp_path_factory.mktemp("carved") / "m"
    r = CliRunner().invoke(app, ["zoo", "carve", "--model", str(dense_dir), "--data", str(corpus), "--out", str(out),
                                 "--experts", str(E_ALL), "--shared", "1", "--top-k", "3", "--calibration-tokens",
                                 "1500", "--eval-tokens", "600", "--ctx-len", "64", "--layers", "0,2"])
    assert r.exit_code == 0, r.output
    return out


def heldout_ids(dense_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_dir)
    texts = [json.loads(line)["text"] for line in (corpus / "val.jsonl").read_text().splitlines()[:4]]
    return torch.tensor([tok(t)["input_ids"][:48] for t in texts if len(tok(t)["input_ids"]) >= 48][:3])


def test_all_experts_with_the_router_zeroed_compute_the_dense_model(carved, dense_dir, corpus):
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(carved / "moe").eval()
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert [hasattr(layer.mlp, "experts") for layer in moe.model.layers] == [True, False, True]
    ids = heldout_ids(dense_dir, corpus)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        for layer in (0, 2):
            moe.model.layers[layer].mlp.gate.weight.zero_()
            moe.model.layers[layer].mlp.gate.top_k = E_ALL - 1
        got = moe(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max()))


def test_the_saved_block_is_the_hand_computation_from_the_dense_weights(carved, dense_dir, corpus):
    """On held-out tokens: block(x) = Σ_{e ∈ top-3 of softmax(x Wᵀ)} E·p_e · down[:, g_e] h_{g_e}(x)
    + down[:, s] h_s(x), from the dense model's neurons and the groups report.json lists."""
    from transformers import AutoModelForCausalLM

    report = json.loads((carved / "report.json").read_text())
    moe = AutoModelForCausalLM.from_pretrained(carved / "moe").eval()
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    ids = heldout_ids(dense_dir, corpus)
    seen = {}
    block = moe.model.layers[2].mlp
    handle = block.register_forward_hook(lambda m, a, o: seen.update(x=a[0].reshape(-1, 64), y=o.reshape(-1, 64)))
    with torch.no_grad():
        moe(input_ids=ids)
    handle.remove()
    x, y = seen["x"], seen["y"]
    groups = report["layers"]["2"]
    routed, shared = torch.tensor(groups["routed"]), torch.tensor(groups["shared"])
    assert sorted(torch.cat([routed.flatten(), shared]).tolist()) == list(range(F))  # a partition of the neurons
    mlp = dense.model.layers[2].mlp
    with torch.no_grad():
        h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        p = torch.softmax(x @ block.gate.weight.T, -1)
        top = p.topk(3, dim=-1)
        E = E_ALL - 1
        want = h[:, shared] @ mlp.down_proj.weight[:, shared].T
        for t in range(len(x)):
            for w, e in zip(top.values[t], top.indices[t], strict=True):
                g = routed[e]
                want[t] += E * w * (h[t, g] @ mlp.down_proj.weight[:, g].T)
    assert torch.allclose(y, want, atol=1e-5, rtol=1e-4)
    # and a selected expert weighs 1 within 1 % (the tempered router)
    assert float((E * top.values - 1).abs().max()) < 0.01


def test_report_measures_the_carve_against_the_dense_model(carved):
    r = json.loads((carved / "report.json").read_text())
    assert r["class"] == "Qwen2MoeForCausalLM" and r["spec"]["layers"] == [0, 2]
    assert set(r["ce"]["carved"]) == {"1", "3", "5", "7"}  # ¼, ½, ¾, all of 7 routed, and --top-k 3
    dense = r["ce"]["dense"]["all"]
    assert abs(r["ce"]["carved"]["7"]["all"] - dense) < 1e-3  # every expert on: the dense model (weights 1 ± 0.3 %)
    # (CE need not fall with k on random weights, which predict noise; the block's error does)
    for layer in r["router"].values():
        assert layer["7"]["recall"] == 1.0 and layer["7"]["relative_error"] < 1e-5
        assert 0 < layer["1"]["recall"] <= 1 and layer["1"]["relative_error"] > layer["5"]["relative_error"]


def test_carve_is_deterministic_and_the_random_split_differs(cli, dense_dir, corpus, carved, tmp_path):
    again = carve(cli, dense_dir, corpus, tmp_path / "again", "--layers", "0,2")
    assert again.code == 0, again.err
    a, b = (json.loads((p / "report.json").read_text())["layers"] for p in (carved, tmp_path / "again"))
    assert a == b
    rnd = carve(cli, dense_dir, corpus, tmp_path / "random", "--layers", "0,2", "--split", "random")
    assert rnd.code == 0, rnd.err
    r = json.loads((tmp_path / "random" / "report.json").read_text())["layers"]
    assert r["0"]["shared"] == a["0"]["shared"]  # the shared expert is chosen the same way
    assert r["0"]["routed"] != a["0"]["routed"]


@pytest.mark.parametrize("extra, says", [
    (("--experts", "7"), "not divisible into 7 equal experts"),
    (("--calibration-tokens", "40"), "too few to carve"),
    (("--top-k", "9"), "--top-k 9"),
    (("--layers", "5"), "layers [5] do not exist"),
    (("--split", "kmeans"), "unknown split"),
    (("--router", "centroid"), "unknown router"),
])
def test_bad_carves_are_refused_with_one_line(cli, dense_dir, corpus, tmp_path, extra, says):
    r = carve(cli, dense_dir, corpus, tmp_path / "out", *extra)
    assert r.code == 2 and len(r.error_lines) == 1 and says in r.error_lines[0], r.err
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_swiglu_block_is_refused(cli, tiny_olmoe_dir, corpus, tmp_path):
    r = carve(cli, tiny_olmoe_dir, corpus, tmp_path / "out")
    assert r.code == 2 and len(r.error_lines) == 1 and "no SwiGLU block" in r.error_lines[0], r.err
    assert not (tmp_path / "out").exists()


def test_central_neurons_by_hand():
    """CMoE's representative: the neuron of each group whose unit profile is closest to the group's mean."""
    import numpy as np

    from deepseemoe.zoo.carve import central_neurons

    s = 1 / np.sqrt(2)
    profile = np.array([[1, 0, 0], [s, s, 0], [0, 1, 0],  # group 0: the mean (1+s, 1+s, 0)/3 is nearest [s, s, 0]
                        [0, 0, 1], [0, s, s], [1, 0, 0]])  # group 1 (rows 3, 4, 5): mean (1, s, 1+s)/3
    groups = np.array([[0, 1, 2], [3, 4, 5]])
    mean1 = profile[[3, 4, 5]].mean(0)
    best1 = [3, 4, 5][int(np.argmax(profile[[3, 4, 5]] @ mean1))]  # by hand: cosines 1+s, s(1+2s)... → row 3
    assert central_neurons(profile, groups).tolist() == [1, best1] and best1 == 3


def test_the_analytic_router_scores_each_expert_by_one_of_its_own_neurons(dense_dir, corpus, tmp_path):
    """--router analytic (CMoE's): every router row of the saved model is the dense gate projection of a
    neuron of that expert's own group (up to the tempering's positive scale)."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from deepseemoe.cli import app

    out = tmp_path / "analytic"
    r = CliRunner().invoke(app, ["zoo", "carve", "--model", str(dense_dir), "--data", str(corpus), "--out", str(out),
                                 "--experts", str(E_ALL), "--shared", "1", "--top-k", "3", "--calibration-tokens",
                                 "1500", "--eval-tokens", "600", "--ctx-len", "64", "--layers", "1",
                                 "--router", "analytic"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    routed = torch.tensor(report["layers"]["1"]["routed"])
    gate = AutoModelForCausalLM.from_pretrained(out / "moe").model.layers[1].mlp.gate.weight.detach()
    rows = AutoModelForCausalLM.from_pretrained(dense_dir).model.layers[1].mlp.gate_proj.weight.detach()
    cos = torch.nn.functional.normalize(gate, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T  # [E, F]
    for e in range(len(routed)):
        best = int(cos[e].argmax())
        assert float(cos[e, best]) == pytest.approx(1.0, abs=1e-5) and best in routed[e].tolist()
