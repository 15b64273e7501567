"""Silencing one hidden unit of a fused experts module, on both of transformers' weight layouts
(OLMoE stores down_proj [E, D, F], GPT-OSS [E, F, D]).

Independent reference: the experts module's own forward. Silencing neuron i of expert e must change
that expert's output on token t by h_i(x_t)·v for one fixed vector v (the neuron's write), where
h_i is read from the gate/up projections only, must leave every other expert alone, and must put the
weights back afterwards."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.models.experts import fused_expert_neurons, fused_expert_width, silenced_expert_neurons
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.tiny import tiny_model


@pytest.mark.parametrize("model_type", ["olmoe", "gpt_oss"])
def test_a_silenced_expert_neuron_stops_writing_and_nothing_else_changes(model_type):
    handle = handle_from_model(tiny_model(model_type), None)
    experts = next(iter(handle.moe_layers.values())).experts
    assert bool(experts.is_transposed) == (model_type == "gpt_oss")
    torch.manual_seed(0)
    D = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
    x = torch.randn(7, D)
    F = fused_expert_width(experts)
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}

    def out(e: int) -> torch.Tensor:
        with torch.no_grad():
            return experts(x, torch.full((7, 1), e), torch.ones(7, 1))

    full = {e: out(e) for e in (1, 2)}
    neuron = F - 2
    with silenced_expert_neurons(experts, torch.tensor([1]), torch.tensor([neuron])):
        silenced = {e: out(e) for e in (1, 2)}
    with torch.no_grad():
        h = fused_expert_neurons(experts, x, 1)[:, neuron]
    delta = full[1] - silenced[1]  # [T, D] = h_i(x_t) · v
    v = delta[0] / h[0]
    assert torch.allclose(delta, h[:, None] * v[None, :], atol=1e-5)
    assert v.abs().max() > 1e-3  # the neuron wrote something
    assert torch.equal(full[2], silenced[2])
    for n, p in experts.named_parameters():
        assert torch.equal(p, before[n]), n
