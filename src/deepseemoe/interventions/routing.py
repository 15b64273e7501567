"""Routing interventions: ablate, exclude, force, random — one rewrite of (idx, weights) per layer.

Shapes: idx [T, K] int64, weights [T, K], logits [T, E]; T is the tokens of one call (the new
tokens only, during cached generation).

Every rewrite goes through the adapter's `intervene`, i.e. a pre-hook on the experts module,
so the router itself is untouched and capture hooks see the rewritten routing. An ablated
expert gets weight 0 and keeps its slot: mapping it to the `num_experts` sentinel makes
grouped_mm silently return garbage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle, MoELayer, RoutingRewrite


def _banned_mask(layer: MoELayer, experts: Iterable[int], device) -> torch.Tensor:
    experts = list(experts)
    bad = [e for e in experts if not 0 <= e < layer.num_experts]
    if bad:
        raise DeepSeeMoEError(f"layer {layer.layer} has experts 0..{layer.num_experts - 1}; {bad} do not exist")
    banned = torch.zeros(layer.num_experts, dtype=torch.bool, device=device)
    banned[experts] = True
    return banned


def ablate(experts: Iterable[int], renorm: bool = False) -> RoutingRewrite:
    """Zero the weight of `experts`; with `renorm`, rescale the token's other weights to its
    original total (not to 1: routers with routed_scaling_factor or no renormalisation keep
    their own total)."""
    experts = list(experts)

    def rewrite(layer, idx, w, logits):
        hit = torch.isin(idx, _banned_mask(layer, experts, idx.device).nonzero().flatten())
        new_w = w.masked_fill(hit, 0)
        if renorm:
            total, kept = w.sum(-1, keepdim=True), new_w.sum(-1, keepdim=True)
            new_w = torch.where(kept > 0, new_w * (total / kept.clamp_min(torch.finfo(w.dtype).tiny)), new_w)
        return idx, new_w

    return rewrite


def exclude(experts: Iterable[int]) -> RoutingRewrite:
    """Make `experts` unselectable: the router's own rule re-selects the top-k without them."""
    experts = list(experts)

    def rewrite(layer, idx, w, logits):
        if logits is None:
            raise DeepSeeMoEError(f"layer {layer.layer}: router logits were not seen, so 'exclude' cannot re-select")
        new_idx, new_w = layer.adapter.select(layer, logits, _banned_mask(layer, experts, logits.device))
        return new_idx, new_w

    return rewrite


def force(idx: torch.Tensor | list[int], weights: torch.Tensor | list[float]) -> RoutingRewrite:
    """Route every token to fixed experts with fixed weights ([K] broadcast, or [T, K])."""
    fixed_idx = torch.as_tensor(idx, dtype=torch.long)
    fixed_w = torch.as_tensor(weights, dtype=torch.float32)

    def rewrite(layer, idx_, w_, logits):
        if fixed_idx.shape[-1] != idx_.shape[-1]:
            raise DeepSeeMoEError(f"forced routing gives {fixed_idx.shape[-1]} experts per token; layer "
                                  f"{layer.layer} routes to {idx_.shape[-1]}")
        _banned_mask(layer, fixed_idx.flatten().tolist(), idx_.device)  # range check
        return (fixed_idx.to(idx_.device).expand_as(idx_).contiguous(),
                fixed_w.to(device=w_.device, dtype=w_.dtype).expand_as(w_).contiguous())

    return rewrite


def random_routing(seed: int, weights: str = "keep") -> RoutingRewrite:
    """K distinct experts drawn uniformly per token. `weights="keep"` keeps the router's weights
    in rank order; "uniform" splits the token's original total evenly. Seeded: the same calls
    in the same order give the same routing."""
    if weights not in ("keep", "uniform"):
        raise DeepSeeMoEError(f"random routing weights must be 'keep' or 'uniform', not {weights!r}")
    generators: dict[int, torch.Generator] = {}

    def rewrite(layer, idx, w, logits):
        g = generators.setdefault(layer.layer, torch.Generator().manual_seed(seed * 100_003 + layer.layer))
        T, K = idx.shape
        new_idx = torch.rand(T, layer.num_experts, generator=g).topk(K, dim=-1).indices.to(idx.device)
        if weights == "keep":
            return new_idx, w
        return new_idx, (w.sum(-1, keepdim=True) / K).expand_as(w).contiguous()

    return rewrite


@contextlib.contextmanager
def route_intervention(handle: ModelHandle, rewrites: Mapping[int, RoutingRewrite]) -> Iterator[None]:
    """Apply `rewrites` (decoder-layer index → rewrite) to every forward inside the block,
    `model.generate()` included."""
    hooks = []
    try:
        for layer_idx, rewrite in rewrites.items():
            layer = handle.moe_layers.get(layer_idx)
            if layer is None:
                raise DeepSeeMoEError(f"layer {layer_idx} is not an MoE layer; MoE layers: {sorted(handle.moe_layers)}")
            hooks += layer.adapter.intervene(layer, rewrite)
        yield
    finally:
        for h in hooks:
            h.remove()
