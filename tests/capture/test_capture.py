"""Capture: hooks are read-only, captures equal independent references, masks and early stop.

References: Hugging Face's own `output_hidden_states` / `output_router_logits`, test hooks,
and a manual recomputation of dense MLP neurons from the layer weights.
"""

from __future__ import annotations

import pytest
import torch

from deepseemoe.capture.consumers import ActivationCollector, RoutingRecorder
from deepseemoe.capture.core import Site, run_capture, token_mask
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.tiny import tiny_model


@pytest.fixture(scope="module")
def olmoe():
    return handle_from_model(tiny_model("olmoe"))


def _ids(b=2, s=9, seed=0):
    return torch.randint(3, 100, (b, s), generator=torch.Generator().manual_seed(seed))


def test_hooks_do_not_change_logits_and_match_hf(olmoe):
    ids = _ids()
    with torch.no_grad():
        ref = olmoe.model(input_ids=ids, output_hidden_states=True, output_router_logits=True)
    layers = sorted(olmoe.moe_layers)
    rec = RoutingRecorder(layers, logits=True)
    acts = ActivationCollector([Site("resid_out", 0), Site("logits")])
    run_capture(olmoe, ids, [rec, acts], exclude_bos=False)
    # hooks changed nothing: final logits identical
    assert torch.equal(acts.tensor(Site("logits")), ref.logits.reshape(-1, ref.logits.shape[-1]))
    # resid_out of layer 0 == HF hidden_states[1] (hidden_states[0] is the embedding output)
    assert torch.equal(acts.tensor(Site("resid_out", 0)), ref.hidden_states[1].reshape(-1, ref.hidden_states[1].shape[-1]))
    for i, layer in enumerate(layers):
        logits = rec.batches[0]["logits"][layer]
        assert torch.equal(logits, ref.router_logits[i].float())
        # OLMoE router (norm_topk_prob=False): softmax → top-k, recomputed by hand from HF's logits
        w_ref, idx_ref = torch.softmax(ref.router_logits[i].float(), -1).topk(2, dim=-1)
        assert torch.equal(rec.batches[0]["idx"][layer], idx_ref)
        torch.testing.assert_close(rec.batches[0]["weights"][layer], w_ref)


def test_mask_drops_padding_and_bos():
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    m = token_mask(ids, attn, bos_token_id=1, exclude_bos=True)
    assert m.tolist() == [False, True, True, True, False, True, True, False]
    assert token_mask(ids, attn, 1, exclude_bos=False).tolist() == [True] * 7 + [False]


def test_masked_capture_keeps_only_real_tokens(olmoe):
    ids = _ids()
    ids[:, 0] = olmoe.model.config.bos_token_id
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0
    acts = ActivationCollector([Site("block_in", 1)])
    batch = run_capture(olmoe, ids, [acts], attention_mask=attn)
    assert acts.tensor(Site("block_in", 1)).shape[0] == 2 * 9 - 2 - 3
    assert torch.equal(batch.token_ids, ids.reshape(-1)[batch.mask])


def test_early_stop_gives_same_capture_and_skips_layers(olmoe):
    ids = _ids()
    before = [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in olmoe.layers]
    calls = []
    hook = olmoe.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    early = ActivationCollector([Site("resid_out", 0), Site("routing", 0)])
    run_capture(olmoe, ids, [early], exclude_bos=False, stop_early=True)
    assert calls == []  # the last layer never ran
    full = ActivationCollector([Site("resid_out", 0), Site("routing", 0)])
    run_capture(olmoe, ids, [full], exclude_bos=False, stop_early=False)
    hook.remove()
    assert calls == [1]
    for s in early.sites:
        assert torch.equal(early.tensor(s), full.tensor(s))
    # the model is reusable afterwards and no hook was left behind
    assert [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in olmoe.layers] == before


def test_expert_outputs_sum_to_block_output(olmoe):
    ids = _ids()
    acts = ActivationCollector([Site("expert_out", 1), Site("routing", 1), Site("block_out", 1)])
    batch = run_capture(olmoe, ids, [acts], exclude_bos=False)
    y = acts.tensor(Site("expert_out", 1))
    w = batch.routing_weights[1]
    torch.testing.assert_close((w.unsqueeze(-1) * y).sum(1), acts.tensor(Site("block_out", 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "olmo", "gpt2"])
def test_dense_mlp_neurons_match_manual_recomputation(model_type):
    model = tiny_model(model_type, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    handle = handle_from_model(model)
    assert not handle.is_moe and sorted(handle.dense_mlps) == list(range(handle.num_layers))
    ids = _ids()
    acts = ActivationCollector([Site("mlp_neurons", 0), Site("block_in", 0)])
    run_capture(handle, ids, [acts], exclude_bos=False)
    mlp = handle.layers[0].mlp
    x = acts.tensor(Site("block_in", 0))
    with torch.no_grad():  # reference: the MLP's hidden units from its own weights
        if model_type == "gpt2":  # Conv1D stores [in, out]; GELU (tanh approximation)
            manual = mlp.act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
            width = model.config.n_inner or 4 * model.config.n_embd
        else:
            manual = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            width = model.config.intermediate_size
    assert handle.dense_mlps[0].num_neurons == width
    torch.testing.assert_close(acts.tensor(Site("mlp_neurons", 0)), manual, rtol=1e-5, atol=1e-6)


def test_bf16_capture_runs():
    handle = handle_from_model(tiny_model("mixtral").to(torch.bfloat16))
    rec = RoutingRecorder(sorted(handle.moe_layers))
    run_capture(handle, _ids(), [rec])
    assert rec.batches[0]["idx"][0].shape[1] == 2


def test_bad_sites_are_clear_errors(olmoe):
    with pytest.raises(DeepSeeMoEError, match="unknown capture site"):
        Site("nope", 0)
    with pytest.raises(DeepSeeMoEError, match="does not exist"):
        run_capture(olmoe, _ids(), [ActivationCollector([Site("resid_out", 7)])])
