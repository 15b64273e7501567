"""Discovery of a model's decoder layers and MoE layers, and the adapters that hook them.

Shapes: x [T, D], idx [T, K], weights [T, K], logits [T, E]; T = B·S flattened batch-major.

The standard design (60 of 64 MoE configs in transformers 5.23): a block holding a `gate` or
`router` that returns (logits, weights, idx) and an `experts` module called as
`experts(x, idx, weights)`. The experts call arguments carry the routing after every router
post-processing step, so they are where routing is read and rewritten. Designs that do not
fit are listed in UNSUPPORTED with the reason, so that discovery fails loudly instead of
analysing something wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.experts import (
    fused_expert_neurons,
    hooks_bypassed,
    recall_expert_outputs,
    repack_experts_call,
    unpack_experts_call,
)
from deepseemoe.models.handle import DenseMLP, MoEAdapter, MoELayer, RoutingEvent, RoutingRewrite
from deepseemoe.models.routers import router_family

ROUTER_ATTRS = ("gate", "router")
SHARED_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")

# Block / experts classes whose design the standard adapter cannot read faithfully, with why.
UNSUPPORTED: dict[str, str] = {
    "Llama4TextExperts": "Llama4 scales the expert *input* by dense router scores and its experts take no "
                         "routing arguments; needs a router-output adapter",
    "SwitchTransformersExperts": "Switch experts are a ModuleDict driven by capacity-masked one-hot masks "
                                 "(encoder-decoder); needs a mask adapter",
    "NllbMoeExperts": "NLLB-MoE is broken in transformers 5.x: NllbMoeExperts applies one_hot to an already "
                      "one-hot mask, so only experts 0 and 1 ever run; its routing cannot be analysed",
    "JetMoeMoE": "JetMoE has no experts module: dispatch goes through input_linear/output_linear with sorted "
                 "tensors; needs its own adapter",
    "DogeCDMoE": "Doge routes over product keys inline beside a dense MLP; nothing hookable",
}
# Blocks that post-process the routed sum in a way that is not additive (the routing is still
# captured exactly; only the block-level decomposition carries this caveat).
EXPERTS_ROUTE_THEMSELVES = ("its experts module receives router logits and does the top-k itself, so the routing "
                            "the experts use is not visible to hooks (Aria in transformers < 5.23)")


def _version_specific_unsupported() -> dict[str, str]:
    """Designs that changed between transformers releases, detected from the installed code."""
    found = {}
    try:
        from transformers.models.aria import modeling_aria
    except ImportError:
        return found
    experts = getattr(modeling_aria, "AriaExperts", None)
    if experts is not None and "router_logits" in inspect.signature(experts.forward).parameters:
        found["aria_text"] = EXPERTS_ROUTE_THEMSELVES
    return found


# Model types (from `deepseemoe.models.tiny.moe_model_types`) that cannot pass the coverage
# checks, with the reason; README's "Supported architectures" lists them.
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama4_text": UNSUPPORTED["Llama4TextExperts"],
    "jetmoe": UNSUPPORTED["JetMoeMoE"],
    "doge": UNSUPPORTED["DogeCDMoE"] + " (loads as a dense model)",
    "switch_transformers": "encoder-decoder, not a causal LM; " + UNSUPPORTED["SwitchTransformersExperts"],
    "nllb-moe": "encoder-decoder, not a causal LM; " + UNSUPPORTED["NllbMoeExperts"],
}
VERSION_SPECIFIC_UNSUPPORTED = _version_specific_unsupported()
UNSUPPORTED_MODEL_TYPES.update(VERSION_SPECIFIC_UNSUPPORTED)

# Blocks that multiply the routed sum by `routed_scaling_factor` after the experts module.
POST_SCALED_BLOCKS = frozenset({"BeamMoE", "LagunaSparseMoeBlock", "MiniMaxM3VLSparseMoeBlock",
                                "Step3p7SparseMoeBlock"})
POST_MAP_NOTES: dict[str, str] = {
    "AXK1MoE": "block output passes through post_mlp_layernorm after routed + shared",
    "MuseSparkMoE": "experts run in a projected space (pre/post expert projections)",
}


def find_decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The ModuleList of decoder layers: the one whose element class the model lists in
    `_no_split_modules` (what transformers itself uses to place layers on devices)."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) and type(m[0]).__name__ in no_split]
    if not candidates:
        candidates = [(name, m) for name, m in model.named_modules()
                      if isinstance(m, nn.ModuleList) and len(m)]
    if not candidates:
        raise DeepSeeMoEError(f"{type(model).__name__} has no list of decoder layers; it is not a "
                              "transformer decoder this toolkit can read")
    name, layers = max(candidates, key=lambda c: len(c[1]))
    return name, list(layers)


def _experts_takes_routing(experts: nn.Module) -> bool:
    if hasattr(experts, "has_gate"):
        return True
    try:
        params = list(inspect.signature(experts.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


class StandardAdapter(MoEAdapter):
    """Block with a gate/router returning (logits, weights, idx) and `experts(x, idx, weights)`."""

    name = "standard"

    def observe(self, layer: MoELayer, callback: Callable[[RoutingEvent], None]) -> list[RemovableHandle]:
        pending: dict[str, torch.Tensor] = {}

        def router_hook(module, args, out):
            if not hooks_bypassed():
                pending["logits"] = self.router_logits(out, layer.num_experts)

        def experts_hook(module, args, kwargs, out):
            if hooks_bypassed():
                return
            x, idx, w = unpack_experts_call(args, kwargs)
            out_t = out[0] if isinstance(out, tuple) else out
            callback(RoutingEvent(x=x.reshape(-1, x.shape[-1]), idx=idx, weights=w,
                                  logits=pending.pop("logits", None), output=out_t.reshape(-1, out_t.shape[-1])))

        handles = []
        if layer.router is not None:
            handles.append(layer.router.register_forward_hook(router_hook))
        handles.append(layer.experts.register_forward_hook(experts_hook, with_kwargs=True))
        return handles

    @staticmethod
    def router_logits(out, num_experts: int | None = None) -> torch.Tensor:
        """The logits in a router's output: the tensor itself, else the first floating tuple
        element over all experts (transformers ≤ 5.2x Granite returns (idx, weights, logits)),
        else element 0 (routers with extra classes: Zaya's skip class, Longcat's zero experts)."""
        if isinstance(out, torch.Tensor):
            return out.reshape(-1, out.shape[-1])
        logits = next((t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()
                       and num_experts is not None and t.shape[-1] == num_experts), out[0])
        return logits.reshape(-1, logits.shape[-1])

    def intervene(self, layer: MoELayer, rewrite: RoutingRewrite) -> list[RemovableHandle]:
        pending: dict[str, torch.Tensor] = {}

        def router_hook(module, args, out):
            if not hooks_bypassed():
                pending["logits"] = self.router_logits(out, layer.num_experts)

        def experts_pre(module, args, kwargs):
            if hooks_bypassed():
                return None
            _, idx, w = unpack_experts_call(args, kwargs)
            new_idx, new_w = rewrite(layer, idx, w, pending.pop("logits", None))
            return repack_experts_call(args, kwargs, new_idx.to(idx.dtype), new_w.to(w.dtype))

        handles = []
        if layer.router is not None:
            handles.append(layer.router.register_forward_hook(router_hook, prepend=True))
        handles.append(layer.experts.register_forward_pre_hook(experts_pre, with_kwargs=True, prepend=True))
        return handles

    def expert_outputs(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return recall_expert_outputs(layer.experts, x, idx)

    def expert_neurons(self, layer: MoELayer, x: torch.Tensor, expert: int) -> torch.Tensor:
        return fused_expert_neurons(layer.experts, x, expert)

    def select(self, layer: MoELayer, logits: torch.Tensor,
               banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        family = router_family(layer.router)
        if family.selector is None:
            raise DeepSeeMoEError(f"router {type(layer.router).__name__} ({family.name}) has no re-selection rule, "
                                  "so 'exclude' is unavailable; use 'ablate' instead, or add a selector to "
                                  "deepseemoe.models.routers.ROUTER_FAMILIES")
        return family.selector(layer.router, logits, banned)


STANDARD = StandardAdapter()


def _num_experts(block: nn.Module, router: nn.Module | None, experts: nn.Module) -> int:
    for m in (experts, router, block):
        for a in ("num_experts", "n_routed_experts", "num_local_experts"):
            v = getattr(m, a, None) if m is not None else None
            if isinstance(v, int):
                return v
    p = getattr(experts, "gate_up_proj", None)
    if p is None:
        p = getattr(experts, "down_proj", None)
    if isinstance(p, torch.Tensor) and p.dim() == 3:
        return int(p.shape[0])
    raise DeepSeeMoEError(f"cannot tell how many experts {type(block).__name__} has; it is not a "
                          "supported MoE design (README: Supported architectures)")


def _top_k(block: nn.Module, router: nn.Module | None) -> int:
    for m in (router, block, getattr(router, "config", None)):
        for a in ("top_k", "num_experts_per_tok", "moe_topk", "top_k_experts"):
            v = getattr(m, a, None) if m is not None else None
            if isinstance(v, int):
                return v
    raise DeepSeeMoEError(f"cannot tell the top-k of {type(block).__name__}; it is not a supported MoE "
                          "design (README: Supported architectures)")


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def _combine(block: nn.Module, decoder_layer: nn.Module) -> tuple[str, tuple[str, ...]]:
    shared = tuple(a for a in SHARED_ATTRS if isinstance(getattr(block, a, None), nn.Module))
    if hasattr(block, "shared_expert_gate") and shared:
        return "routed+gated_shared", (*shared, "shared_expert_gate")
    if shared:
        params = inspect.signature(getattr(block, shared[0]).forward).parameters.values()
        if sum(p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD for p in params) > 1:
            return "routed+router-gated shared", shared  # Inkling: shared experts take the router's gammas
        return "routed+shared", shared
    layer_shared = tuple(a for a in SHARED_ATTRS if isinstance(getattr(decoder_layer, a, None), nn.Module))
    if layer_shared:
        return "routed (+layer-level shared MLP)", tuple(f"<layer>.{a}" for a in layer_shared)
    return "routed", ()


def discover_moe_layers(model: nn.Module, layers_path: str, layers: list[nn.Module]) -> dict[int, MoELayer]:
    """Every MoE block inside each decoder layer, keyed by decoder-layer index."""
    found: dict[int, MoELayer] = {}
    for i, decoder_layer in enumerate(layers):
        for rel, block in decoder_layer.named_modules():
            cls = type(block).__name__
            if cls in UNSUPPORTED:
                raise DeepSeeMoEError(f"unsupported MoE architecture {cls}: {UNSUPPORTED[cls]}. Supporting it needs "
                                      "an MoEAdapter of its own (StandardAdapter in deepseemoe/models/registry.py is "
                                      "the one every supported architecture uses)")
            experts = getattr(block, "experts", None)
            if not isinstance(experts, nn.Module):
                continue
            if type(experts).__name__ in UNSUPPORTED:
                ecls = type(experts).__name__
                raise DeepSeeMoEError(f"unsupported MoE architecture {ecls}: {UNSUPPORTED[ecls]}. Supporting it needs "
                                      "an MoEAdapter of its own (StandardAdapter in deepseemoe/models/registry.py is "
                                      "the one every supported architecture uses)")
            router_attr = next((a for a in ROUTER_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
            if router_attr is None:
                continue
            if not _experts_takes_routing(experts):
                raise DeepSeeMoEError(f"unsupported MoE architecture {cls}: {EXPERTS_ROUTE_THEMSELVES}")
            router = getattr(block, router_attr)
            prefix = f"{layers_path}.{i}" + (f".{rel}" if rel else "")
            combine, shared = _combine(block, decoder_layer)
            routed_scale = 1.0
            if cls in POST_SCALED_BLOCKS:
                routed_scale = float(block.routed_scaling_factor)
                combine = "scaled_" + combine
            if block is decoder_layer:  # Gemma4: router and experts sit inline on the decoder layer
                combine = "inline (normed experts beside a dense MLP)"
            notes = (POST_MAP_NOTES[cls],) if cls in POST_MAP_NOTES else ()
            if i in found:
                raise DeepSeeMoEError(f"decoder layer {i} holds two MoE blocks ({found[i].block_path}, {prefix}); "
                                      "this design needs its own adapter")
            found[i] = MoELayer(
                layer=i, block_path=prefix, block=block,
                router_path=f"{prefix}.{router_attr}", router=router,
                experts_path=f"{prefix}.experts", experts=experts,
                num_experts=_num_experts(block, router, experts), top_k=_top_k(block, router),
                router_family=router_family(router, _hidden_size(model)).name, combine=combine, adapter=STANDARD,
                shared_paths=shared, notes=notes, routed_scale=routed_scale,
            )
    return found


# Dense feed-forward layouts: (mlp attribute, module whose input is the neuron activation).
DENSE_LAYOUTS = (("mlp", "down_proj"), ("mlp", "c_proj"), ("feed_forward", "down_proj"), ("mlp", "fc2"))


def discover_dense_mlps(layers_path: str, layers: list[nn.Module]) -> dict[int, DenseMLP]:
    found: dict[int, DenseMLP] = {}
    for i, decoder_layer in enumerate(layers):
        for mlp_attr, out_attr in DENSE_LAYOUTS:
            mlp = getattr(decoder_layer, mlp_attr, None)
            out = getattr(mlp, out_attr, None) if mlp is not None else None
            if out is None or getattr(mlp, "experts", None) is not None:
                continue
            weight = out.weight
            # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
            n = weight.shape[0] if type(out).__name__ == "Conv1D" else weight.shape[1]
            found[i] = DenseMLP(layer=i, path=f"{layers_path}.{i}.{mlp_attr}", module=mlp,
                                neuron_path=f"{layers_path}.{i}.{mlp_attr}.{out_attr}", num_neurons=int(n))
            break
    return found
