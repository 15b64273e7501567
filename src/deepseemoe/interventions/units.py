"""Units of a model — experts, expert neurons, dense MLP neurons, attention heads — their activity on
held-out tokens, and hooks that silence them.

Activity a_u(t) ≥ 0 of unit u on a kept token t (BOS and padding excluded):
- expert            the routing weight given to the expert (0 when not chosen);
- expert neuron     |h| of the expert's hidden neuron when the token is routed to it, else 0;
- MLP neuron        |h| of a dense MLP hidden neuron (the input of down_proj);
- attention head    ‖head output‖ (its slice of the o_proj input).

Silencing: a head by a zero slice of the o_proj input, a dense MLP neuron by a zero down-projection
input, an expert neuron by zero down-projection weights (the fused layout's own flags, read by
`models.experts`); experts themselves are silenced by a routing rewrite (`interventions.routing.ablate`).
A unit is (layer, index); an expert neuron's index is expert·F + neuron.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch

from deepseemoe.models.experts import silenced_expert_neurons
from deepseemoe.models.handle import ModelHandle


class UnitActivity:
    """Hooks that add each unit's activity into per-class sums for one batch at a time."""

    def __init__(self, handle: ModelHandle, n_classes: int, expert_neurons: bool = True):
        self.h, self.C = handle, n_classes
        self.mass: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.expert_neurons = expert_neurons

    def _add(self, kind: str, layer: int, act: torch.Tensor, classes: torch.Tensor) -> None:
        """act [T, U] ≥ 0, classes [T] → mass[kind][layer] [U, C] += Σ_t act per class."""
        onehot = torch.nn.functional.one_hot(classes.long(), self.C).double()
        m = (act.double().T @ onehot).cpu().numpy()
        if layer in self.mass[kind]:
            self.mass[kind][layer] += m
        else:
            self.mass[kind][layer] = m

    def run(self, ids: torch.Tensor, am: torch.Tensor, keep: torch.Tensor, classes: torch.Tensor) -> None:
        h, hooks = self.h, []
        for layer, moe in h.moe_layers.items():
            def cb(ev, layer=layer, moe=moe):
                idx, w, x = ev.idx[keep], ev.weights[keep], ev.x[keep]
                weight = torch.zeros(len(idx), moe.num_experts, device=w.device, dtype=torch.float32)
                weight.scatter_add_(1, idx.long(), w.float())
                self._add("expert", layer, weight, classes)
                if self.expert_neurons:
                    parts = []
                    for e in range(moe.num_experts):
                        routed = (idx == e).any(1)
                        neurons = moe.adapter.expert_neurons(moe, x, e).abs().float()
                        parts.append(neurons * routed[:, None])
                    self._add("expert_neuron", layer, torch.cat(parts, 1), classes)
            hooks += moe.adapter.observe(moe, cb)
        for layer, mlp in h.dense_mlps.items():
            module = h.model.get_submodule(mlp.neuron_path)

            def pre(mod, args, layer=layer):
                a = args[0].reshape(-1, args[0].shape[-1])[keep]
                self._add("mlp_neuron", layer, a.abs().float(), classes)
            hooks.append(module.register_forward_pre_hook(pre))
        for layer in range(h.num_layers):
            found = h.attention_output(layer)
            if found is None:
                continue
            proj, heads = found

            def head_pre(mod, args, layer=layer, heads=heads):
                a = args[0].reshape(-1, args[0].shape[-1])[keep].float()
                self._add("attention_head", layer, a.view(len(a), heads, -1).norm(dim=-1), classes)
            hooks.append(proj.register_forward_pre_hook(head_pre))
        try:
            with torch.no_grad():
                h.model(input_ids=ids, attention_mask=am, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()


class _Hook:
    def __init__(self, module, fn):
        self.module, self.fn, self.handle = module, fn, None

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self.fn)

    def __exit__(self, *exc):
        self.handle.remove()


def zero_heads(proj, chosen, heads: int) -> _Hook:
    """While entered: the slices of heads `chosen` of the `heads` concatenated in `proj`'s input are 0."""
    chosen = list(chosen)

    def fn(mod, args):
        x = args[0].clone()
        d = x.shape[-1] // heads
        for head in chosen:
            x[..., head * d:(head + 1) * d] = 0
        return (x, *args[1:])
    return _Hook(proj, fn)


def zero_neurons(module, neurons) -> _Hook:
    """While entered: the inputs `neurons` of `module` (a down projection: its hidden units) are 0."""
    idx = torch.as_tensor(neurons, dtype=torch.long)

    def fn(mod, args):
        x = args[0].clone()
        x[..., idx.to(x.device)] = 0
        return (x, *args[1:])
    return _Hook(module, fn)


def by_layer(chosen: list[tuple[int, int]], make) -> dict:
    layers: dict[int, list[int]] = {}
    for la, u in chosen:
        layers.setdefault(la, []).append(u)
    return {la: make(us) for la, us in layers.items()}


@contextlib.contextmanager
def zero_expert_neurons(handle: ModelHandle, chosen: list[tuple[int, int]], width: dict[int, int]):
    """While entered, the chosen expert neurons (unit u = expert·F + neuron, F = `width[layer]`) write
    nothing, every layer at once."""
    with contextlib.ExitStack() as stack:
        for la, us in by_layer(chosen, list).items():
            e = torch.tensor([u // width[la] for u in us])
            i = torch.tensor([u % width[la] for u in us])
            stack.enter_context(silenced_expert_neurons(handle.moe_layers[la].experts, e, i))
        yield


@contextlib.contextmanager
def zero_mlp_neurons(handle: ModelHandle, chosen: list[tuple[int, int]]):
    """Zero the chosen dense MLP neurons (their down projection's input), every layer at once."""
    with contextlib.ExitStack() as stack:
        for la, us in by_layer(chosen, list).items():
            stack.enter_context(zero_neurons(handle.model.get_submodule(handle.dense_mlps[la].neuron_path), us))
        yield


@contextlib.contextmanager
def zero_layer_heads(heads: dict[int, tuple[torch.nn.Module, int]], chosen: list[tuple[int, int]]):
    """Zero the chosen heads' slices of their layer's attention output projection input."""
    with contextlib.ExitStack() as stack:
        for la, us in by_layer(chosen, list).items():
            stack.enter_context(zero_heads(heads[la][0], us, heads[la][1]))
        yield
