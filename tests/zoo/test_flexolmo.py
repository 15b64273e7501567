"""Experts trained separately (FlexOlmo-style): the merged model reloads through `load_model` like a
hub model, and computes, for a token routed to the public expert and domain expert d, the
router-weighted sum of the two FFNs as trained — each FFN computed by hand from the part it came
from (the public base's MLP, the domain's training pair), the router weights by hand from the
router rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from deepseemoe.models.handle import declared_expert_names
from deepseemoe.models.load import load_model
from deepseemoe.zoo.flexolmo import PUBLIC, SeparateRecipe, domain_embeddings, train_separate


@pytest.fixture(scope="module")
def separate(zoo):
    _, root = zoo
    return train_separate(root / "corpus", recipe="tiny", cache_dir=root / "cache", progress=False), root


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def block_inputs(model, ids) -> dict[int, torch.Tensor]:
    seen = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, la=la: seen.__setitem__(la, a[0].reshape(-1, a[0].shape[-1])))
             for la, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def test_merged_model_reloads_and_reproduces_its_parts(separate):
    models, _ = separate
    handle = load_model(str(models.model_dir))
    assert handle.model_type == "flex_olmo" and handle.is_moe
    domains = models.report["domains"]
    assert declared_expert_names(handle.model.config) == [PUBLIC, *domains]
    assert all(m.num_experts == 1 + len(domains) and m.top_k == 2 for m in handle.moe_layers.values())

    merged = handle.model.eval()
    base = Olmo2ForCausalLM.from_pretrained(models.base_dir).eval()
    pairs = {d: FlexOlmoForCausalLM.from_pretrained(models.expert_dirs[d]).eval() for d in domains}
    text = "def main():\n    return 0\nDer Hund schläft. El perro duerme. The dog sleeps. Собака спит."
    ids = torch.tensor([handle.tokenizer(text)["input_ids"]])
    xs = block_inputs(merged, ids)
    checked = 0
    for layer, x in xs.items():
        with torch.no_grad():
            got = merged.model.layers[layer].mlp(x[None])[0]
            public = base.model.layers[layer].mlp(x)  # HF's own OLMo-2 MLP of the public base
            W = merged.model.layers[layer].mlp.gate.weight
            p = torch.softmax(x @ W.T, dim=-1)
            top2 = p.topk(2, dim=-1).indices
            for t in range(len(x)):
                chosen = set(top2[t].tolist())
                if 0 not in chosen:
                    continue
                e = (chosen - {0}).pop()
                d = domains[e - 1]
                ex = pairs[d].model.layers[layer].mlp.experts
                gate, up = ex.gate_up_proj[1].chunk(2, dim=0)
                mine = swiglu(x[t], gate, up, ex.down_proj[1])
                w0, we = p[t, 0], p[t, e]
                want = (w0 * public[t] + we * mine) / (w0 + we)  # top-2 weights renormalised (the recipe's)
                torch.testing.assert_close(got[t], want, rtol=1e-4, atol=1e-5)
                # the same formula with the pair's own router rows is what HF computes for the pair
                rows = pairs[d].model.layers[layer].mlp.gate.weight
                q = torch.softmax(x[t] @ rows.T, dim=-1)
                torch.testing.assert_close(pairs[d].model.layers[layer].mlp(x[t][None, None])[0, 0],
                                           q[0] * public[t] + q[1] * mine, rtol=1e-4, atol=1e-5)
                checked += 1
    assert checked >= 5, f"only {checked} tokens went to the public expert and one domain expert"


def test_public_expert_is_the_base_and_domain_experts_learned(separate):
    models, _ = separate
    merged = FlexOlmoForCausalLM.from_pretrained(models.model_dir)
    base = Olmo2ForCausalLM.from_pretrained(models.base_dir)
    for layer, block in enumerate(merged.model.layers):
        mlp = base.model.layers[layer].mlp
        gate, up = block.mlp.experts.gate_up_proj[0].chunk(2, dim=0)
        assert torch.equal(gate, mlp.gate_proj.weight) and torch.equal(up, mlp.up_proj.weight)
        assert torch.equal(block.mlp.experts.down_proj[0], mlp.down_proj.weight)
        for e in range(1, block.mlp.experts.gate_up_proj.shape[0]):  # initialised from the base, then trained
            assert not torch.equal(block.mlp.experts.gate_up_proj[e], block.mlp.experts.gate_up_proj[0])
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_budget_and_report(separate, zoo):
    models, root = separate
    r = models.report
    recipe, steps = r["recipe"], r["steps"]
    assert steps == SeparateRecipe().steps(type("R", (), {"steps": recipe["steps"]})(), len(r["domains"]))
    # the total is the joint recipe's budget, up to the experts' rounding down
    assert r["tokens"]["joint_per_model"] - len(r["domains"]) * recipe["batch_size"] * recipe["seq_len"] \
        < r["tokens"]["total"] <= r["tokens"]["joint_per_model"]
    assert set(r["val_loss"]) == {"separate", "public_base", "moe", "dense"}
    assert set(r["val_loss"]["separate"]) == set(r["domains"])
    log = [json.loads(x) for x in (models.root / "base.log.jsonl").read_text().splitlines()]
    assert len(log) == steps["base"] and log[-1]["loss"] < log[0]["loss"]
    again = train_separate(root / "corpus", recipe="tiny", cache_dir=root / "cache", progress=False)
    assert again.cached and again.root == models.root
    # an interrupted run resumes after its finished phases: the merge is redone, the base is not
    base_weights = (models.base_dir / "model.safetensors").stat().st_mtime_ns
    (models.root / "report.json").unlink()
    resumed = train_separate(root / "corpus", recipe="tiny", cache_dir=root / "cache", progress=False)
    assert not resumed.cached and (models.base_dir / "model.safetensors").stat().st_mtime_ns == base_weights
    assert all((folder / "finished.json").exists() for folder in resumed.expert_dirs.values())


def test_domain_embedding_is_the_mean_unit_block_input():
    from transformers import Olmo2Config

    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    windows = np.random.default_rng(0).integers(0, 50, size=(3, 5))
    got = domain_embeddings(model, windows, batch=2)
    # the block inputs of all windows in one pass, normalised per token and averaged
    xs = block_inputs(model, torch.from_numpy(windows))
    for layer in (0, 1):
        x = xs[layer].double()
        want = (x / x.norm(dim=-1, keepdim=True)).mean(0)
        np.testing.assert_allclose(got[layer], want.float().numpy(), rtol=1e-5, atol=1e-6)
        assert 0 < np.linalg.norm(got[layer]) <= 1
