"""Which weights each post-training strategy adapts, as one PEFT LoRA config, and the expert masks.

PEFT reaches nn.Linear modules through `target_modules` and the fused 3-D expert tensors and the
router's weight parameter through `target_parameters` (a ParamWrapper per parameter: for a 3-D
tensor [E, ·, ·] it holds rank r per expert, lora_A [r·E, in] and lora_B [out, r·E]). LoRA on only
some experts of a fused tensor is that wrapper with the other experts' factor slices held at zero:
lora_B starts at zero and a gradient mask keeps those slices there, so their ΔW is exactly 0.

Strategies (`STRATEGIES`): what a user tries first (`all`: attention, every expert, every router,
shared experts), the same with the router frozen, the router alone (RouterLens), the experts a hint
names at its layer, the same number of random experts there (the control), and the router of the
hint's layer pushed toward the hint's experts (the routing target is in `posttrain.study`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle

STRATEGIES = ("all", "frozen-router", "router-only", "experts-by-hint", "router-by-hint", "random-experts")
HINTED = ("experts-by-hint", "router-by-hint", "random-experts")
PEFT_NEEDED = "0.17.0"  # the first PEFT with target_parameters (LoRA on nn.Parameter, 3-D expert tensors)


def require_peft():
    """PEFT, new enough to reach fused expert tensors; otherwise one line naming the version needed."""
    try:
        import peft
    except ImportError:
        raise DeepSeeMoEError(f"post-train needs PEFT ≥ {PEFT_NEEDED}: pip install \"peft>={PEFT_NEEDED}\"") from None
    from packaging.version import Version

    if Version(peft.__version__) < Version(PEFT_NEEDED):
        raise DeepSeeMoEError(f"PEFT {peft.__version__} cannot put LoRA on fused expert tensors (target_parameters); "
                              f"post-train needs PEFT ≥ {PEFT_NEEDED}: pip install -U \"peft>={PEFT_NEEDED}\"")
    return peft


@dataclass
class Targets:
    """What one strategy adapts: module names (nn.Linear), parameter names (router weights, 3-D
    experts), and for masked expert tensors the experts that may change."""

    modules: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    experts: dict[str, list[int]] = field(default_factory=dict)  # parameter name -> trainable experts


def _linears(model: nn.Module, prefix: str) -> list[str]:
    root = model.get_submodule(prefix)
    return [f"{prefix}.{n}" for n, m in root.named_modules() if n and isinstance(m, nn.Linear)]


def attention_linears(handle: ModelHandle) -> list[str]:
    out = []
    for i, layer in enumerate(handle.layers):
        for name, _child in layer.named_children():
            if "attn" in name or "attention" in name:
                out += _linears(handle.model, f"{handle.layers_path}.{i}.{name}")
    return out


def router_targets(handle: ModelHandle, layers: list[int]) -> Targets:
    t = Targets()
    for la in layers:
        moe = handle.moe_layers[la]
        if moe.router is None:
            raise DeepSeeMoEError(f"layer {la} of {handle.name} has no router module the toolkit recognises")
        if isinstance(moe.router, nn.Linear):
            t.modules.append(moe.router_path)
        elif isinstance(getattr(moe.router, "weight", None), nn.Parameter) and moe.router.weight.dim() == 2:
            t.parameters.append(f"{moe.router_path}.weight")
        else:
            raise DeepSeeMoEError(f"the router of layer {la} ({type(moe.router).__name__}) has no linear weight "
                                  "LoRA can adapt")
    return t


def expert_targets(handle: ModelHandle, layers: list[int], experts: dict[int, list[int]] | None = None) -> Targets:
    """Every expert weight of `layers`: fused 3-D tensors as parameters, per-expert linears as
    modules; `experts[layer]` restricts a layer to those experts (masks on fused tensors)."""
    t = Targets()
    for la in layers:
        moe = handle.moe_layers[la]
        chosen = None if experts is None else experts.get(la)
        fused = [n for n, p in moe.experts.named_parameters(recurse=False) if p.dim() == 3]
        if fused:
            for n in fused:
                name = f"{moe.experts_path}.{n}"
                t.parameters.append(name)
                if chosen is not None:
                    t.experts[name] = sorted(chosen)
            continue
        if isinstance(moe.experts, nn.ModuleList):  # one module per expert
            for e in range(len(moe.experts)):
                if chosen is None or e in chosen:
                    t.modules += _linears(handle.model, f"{moe.experts_path}.{e}")
            continue
        raise DeepSeeMoEError(f"the experts of layer {la} ({type(moe.experts).__name__}) are neither fused 3-D "
                              "tensors nor a list of modules; LoRA cannot reach them")
    for la in layers:
        for path in handle.moe_layers[la].shared_paths:
            if experts is None:  # the shared expert belongs to `all`, not to a hinted subset
                t.modules += _linears(handle.model, shared_path(handle, la, path))
    return t


def shared_path(handle: ModelHandle, layer: int, path: str) -> str:
    """A shared part's path in the model: the registry names it inside the MoE block, or inside the
    decoder layer (`<layer>.NAME`) when it sits beside the block."""
    if path.startswith("<layer>."):
        return f"{handle.layers_path}.{layer}.{path.removeprefix('<layer>.')}"
    block = handle.moe_layers[layer].block_path
    return path if path.startswith(f"{block}.") else f"{block}.{path}"


def strategy_targets(handle: ModelHandle, strategy: str, hint_layer: int | None = None,
                     experts: list[int] | None = None) -> Targets:
    if not handle.is_moe:  # the dense twin: attention and every MLP
        mlps = [m.path for m in handle.dense_mlps.values()]
        return Targets(modules=attention_linears(handle) + [n for p in mlps for n in _linears(handle.model, p)])
    layers = sorted(handle.moe_layers)
    if strategy in ("all", "frozen-router"):
        t = expert_targets(handle, layers)
        t.modules = attention_linears(handle) + t.modules
        if strategy == "all":
            r = router_targets(handle, layers)
            t.modules += r.modules
            t.parameters += r.parameters
        return t
    if strategy == "router-only":
        return router_targets(handle, layers)
    if strategy == "router-by-hint":
        return router_targets(handle, [hint_layer])
    if strategy in ("experts-by-hint", "random-experts"):
        return expert_targets(handle, [hint_layer], {hint_layer: list(experts or [])})
    raise DeepSeeMoEError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def lora_size(model: nn.Module, targets: Targets) -> int:
    """Trainable LoRA parameters per unit of rank: in + out for every adapted matrix (A is r × in,
    B is out × r), per trainable expert for a 3-D tensor [E, out, in] (PEFT's per-expert factors).
    The count at rank r is r times this, which is how budgets are matched across models."""
    n = 0
    for name in targets.modules:
        m = model.get_submodule(name)
        n += m.in_features + m.out_features
    for name in targets.parameters:
        p = model.get_parameter(name)
        per = p.shape[-1] + p.shape[-2]
        n += per * (len(targets.experts[name]) if name in targets.experts else p.shape[0] if p.dim() == 3 else 1)
    return n


def apply_lora(model: nn.Module, targets: Targets, rank: int, alpha: float):
    """The PEFT model with these targets (LoRA A Kaiming-initialised from torch's current seed, B zero)
    and the trainable-parameter count, masked expert slices excluded."""
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets.modules or [],
                             target_parameters=targets.parameters or None, bias="none")
    import warnings

    with warnings.catch_warnings():  # transformers' deprecation of the attribute PEFT reads; not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        pm = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    for name, chosen in targets.experts.items():
        trainable -= mask_experts(pm, name, chosen, rank)
    return pm, trainable


def _wrapper(pm: nn.Module, parameter: str):
    """PEFT's ParamWrapper of `parameter`: PEFT puts it at the owner module's path, one wrapper per
    adapted parameter of that module, each wrapping the next (`base_layer`)."""
    from peft.tuners.lora.layer import ParamWrapper

    owner, _, name = parameter.rpartition(".")
    module = pm.base_model.model.get_submodule(owner)
    while isinstance(module, ParamWrapper):
        if module.parameter_name == name:
            return module
        module = module.base_layer
    raise DeepSeeMoEError(f"PEFT did not wrap {parameter}")


def expert_slices(num_experts: int, rank: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of PEFT's per-expert LoRA factors for a 3-D parameter: rows of lora_A [r·E, in] are
    expert-major (expert e owns rows e·r … e·r+r-1), columns of lora_B [out, r·E] rank-major
    (expert e owns columns j·E + e): PEFT reshapes A to [E, r, in] and B to [out, r, E]."""
    rows = torch.zeros(num_experts * rank, 1)
    cols = torch.zeros(1, num_experts * rank)
    for e in experts:
        rows[e * rank:(e + 1) * rank] = 1
        cols[0, [j * num_experts + e for j in range(rank)]] = 1
    return rows, cols


def mask_experts(pm: nn.Module, parameter: str, experts: list[int], rank: int) -> int:
    """Hold every expert of `parameter` but `experts` at ΔW = 0; returns the parameters so frozen."""
    w = _wrapper(pm, parameter)
    A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
    rows, cols = expert_slices(w.num_experts, rank, experts)
    rows, cols = rows.to(A), cols.to(B)
    with torch.no_grad():
        B.mul_(cols)  # zero already (PEFT's init); kept explicit
    A.register_hook(lambda g, m=rows: g * m)
    B.register_hook(lambda g, m=cols: g * m)
    return int((1 - rows).sum()) * A.shape[1] + int((1 - cols).sum()) * B.shape[0]


def merged(pm: nn.Module) -> nn.Module:
    """The base model with the adapters folded into its weights (PEFT's own merge)."""
    return pm.merge_and_unload()
