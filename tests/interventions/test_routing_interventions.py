"""Routing interventions against manual recomputations.

References: the Hugging Face experts module called directly with hand-built (idx, weights);
router math recomputed by hand on masked logits; the native bias trick (a -1e4 correction
bias / router bias) for DeepSeek-V3 and GPT-OSS; a Mixtral with the excluded expert deleted
from its weights.
"""

from __future__ import annotations

import pytest
import torch

from deepseemoe.interventions.routing import ablate, exclude, force, random_routing, route_intervention
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.registry import UNSUPPORTED_MODEL_TYPES
from deepseemoe.models.tiny import moe_model_types, tiny_model

MAIN = ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"]
STANDARD = [t for t in moe_model_types() if t not in UNSUPPORTED_MODEL_TYPES]
IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))


def _run_with_probe(handle, layer_idx, rewrites=None):
    """Forward, returning what the experts module of `layer_idx` received and returned."""
    seen = {}
    experts = handle.moe_layers[layer_idx].experts

    def hook(mod, args, kwargs, out):
        seen["args"] = [a.clone() for a in args]
        seen["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    h = experts.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            if rewrites:
                with route_intervention(handle, rewrites):
                    handle.model(input_ids=IDS)
            else:
                handle.model(input_ids=IDS)
    finally:
        h.remove()
    return seen


def _first_moe(handle):
    return min(handle.moe_layers)


@pytest.mark.parametrize("model_type", STANDARD)
def test_ablate_equals_manual_recomputation(model_type):
    handle = handle_from_model(tiny_model(model_type))
    layer = _first_moe(handle)
    base = _run_with_probe(handle, layer)
    x, idx, w = base["args"][:3]
    expert = int(idx[0, 0])
    for renorm in (False, True):
        got = _run_with_probe(handle, layer, {layer: ablate([expert], renorm=renorm)})
        manual_w = w.clone()
        manual_w[idx == expert] = 0
        if renorm:
            total, kept = w.sum(-1, keepdim=True), manual_w.sum(-1, keepdim=True)
            manual_w = torch.where(kept > 0, manual_w * total / kept, manual_w)
        assert torch.equal(got["args"][1], idx)
        assert (got["args"][2][idx == expert] == 0).all()
        with torch.no_grad():
            manual_out = handle.moe_layers[layer].experts(x, idx, manual_w)
        torch.testing.assert_close(got["out"], manual_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", STANDARD)
def test_force_equals_half_half_mixture(model_type):
    handle = handle_from_model(tiny_model(model_type))
    layer = _first_moe(handle)
    moe = handle.moe_layers[layer]
    K = moe.top_k
    fixed = list(range(K))
    weights = [1.0 / K] * K
    got = _run_with_probe(handle, layer, {layer: force(fixed, weights)})
    x = got["args"][0]
    x = x.reshape(-1, x.shape[-1])  # DBRX passes [B, S, D]
    T = x.shape[0]
    with torch.no_grad():  # reference: each forced expert run alone by the HF module (a 0-weight twin slot
        # because Longcat cannot take K=1), averaged
        parts = [moe.experts(x, torch.full((T, 2), e), torch.tensor([[1.0, 0.0]]).expand(T, 2)) for e in fixed]
    torch.testing.assert_close(got["out"].reshape(T, -1), sum(parts).reshape(T, -1) / K, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", MAIN)
def test_exclude_never_selects_banned_and_matches_hand_math(model_type):
    handle = handle_from_model(tiny_model(model_type))
    layer = _first_moe(handle)
    moe = handle.moe_layers[layer]
    logits_seen = {}
    def keep_logits(module, args, out):
        logits_seen.setdefault("l", out[0].detach().clone())

    h = moe.router.register_forward_hook(keep_logits)
    base = _run_with_probe(handle, layer)
    h.remove()
    expert = int(base["args"][1][0, 0])
    got = _run_with_probe(handle, layer, {layer: exclude([expert])})
    idx, w = got["args"][1], got["args"][2]
    assert not (idx == expert).any()
    logits = logits_seen["l"].float()
    K = moe.top_k
    if model_type in ("mixtral", "olmoe", "qwen3_moe"):  # softmax over all → mask → top-k (→ renorm)
        p = torch.softmax(logits, -1)
        p[:, expert] = -1
        ref_w, ref_idx = p.topk(K, -1)
        if model_type == "mixtral" or moe.router.norm_topk_prob:
            ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        assert torch.equal(torch.sort(idx, -1).values, torch.sort(ref_idx, -1).values)
        torch.testing.assert_close(torch.sort(w.float(), -1).values, torch.sort(ref_w, -1).values)
    else:  # native bias trick: a -1e4 selection bias on the expert, no intervention
        bias = moe.router.e_score_correction_bias if model_type == "deepseek_v3" else moe.router.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias[expert] -= 1e4
        native = _run_with_probe(handle, layer)
        with torch.no_grad():
            bias.copy_(saved)
        assert torch.equal(torch.sort(idx, -1).values, torch.sort(native["args"][1], -1).values)
        if model_type == "deepseek_v3":  # weights use unbiased scores, so they must agree too
            torch.testing.assert_close(torch.sort(w, -1).values, torch.sort(native["args"][2], -1).values)


def test_exclude_in_mixtral_equals_a_model_without_that_expert():
    """Mixtral renormalises the top-k, so excluding expert e == the same model with e deleted."""
    model = tiny_model("mixtral")
    handle = handle_from_model(model)
    expert = 3
    with torch.no_grad(), route_intervention(handle, {i: exclude([expert]) for i in handle.moe_layers}):
        got = model(input_ids=IDS).logits
    pruned = tiny_model("mixtral", num_local_experts=7)
    keep = [e for e in range(8) if e != expert]
    with torch.no_grad():
        state = model.state_dict()
        for k, v in state.items():
            if k.endswith("gate.weight") or k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
                state[k] = v[keep]
        pruned.load_state_dict(state)
        ref = pruned(input_ids=IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_random_routing_is_seeded_and_distinct():
    handle = handle_from_model(tiny_model("olmoe"))
    layer = _first_moe(handle)
    a = _run_with_probe(handle, layer, {layer: random_routing(seed=7)})
    b = _run_with_probe(handle, layer, {layer: random_routing(seed=7)})
    c = _run_with_probe(handle, layer, {layer: random_routing(seed=8)})
    assert torch.equal(a["args"][1], b["args"][1]) and not torch.equal(a["args"][1], c["args"][1])
    idx = a["args"][1]
    assert all(len(set(row.tolist())) == idx.shape[1] for row in idx)
    u = _run_with_probe(handle, layer, {layer: random_routing(seed=7, weights="uniform")})
    base = _run_with_probe(handle, layer)
    torch.testing.assert_close(u["args"][2].sum(-1), base["args"][2].sum(-1))


@pytest.mark.parametrize("model_type", MAIN)
def test_generate_under_intervention(model_type):
    handle = handle_from_model(tiny_model(model_type))
    layer = _first_moe(handle)
    chosen = []
    h = handle.moe_layers[layer].experts.register_forward_hook(
        lambda m, a, k, o: chosen.append(a[1].clone()), with_kwargs=True)
    with route_intervention(handle, {layer: ablate([0]), **{i: exclude([1]) for i in handle.moe_layers if i != layer}}):
        out = handle.model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    h.remove()
    assert out.shape[1] == IDS.shape[1] + 4
    assert len(chosen) == 4  # prompt + 3 cached steps, each with T = new tokens
