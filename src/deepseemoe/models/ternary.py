"""Ternary weights by BitNet b1.58's absmean rule, after training or during it.

    s = mean |W|                       over the whole matrix (per="tensor") or each output row (per="row")
    W_q = clip(round(W / s), −1, 1) · s

Shapes: a Linear weight is [out, in]; a fused experts parameter is a stack of one matrix per
expert, [E, out, in] (or [E, in, out] when the module says `is_transposed`), and "the matrix" is
then each expert's own (s per expert, or per expert row). Which tensors: `parts` of
- "experts": every ≥2-D parameter of each MoE layer's experts module (fused stacks, or the
  Linear weights of a ModuleList of experts); shared experts are not routed and stay float;
- "router": each MoE layer's router weight [E, D];
- "mlp": the Linear weights of each dense MLP (a dense model's feed-forward layers).
Attention, embeddings, norms and the LM head stay float, as in BitNet.

Training: a straight-through estimator — the forward pass uses W_q, the gradient passes to the
float W as if W_q = W (`train_ternary`, a torch parametrization; `bake` writes W_q into the
weights at the end, so the saved model is a plain Hugging Face model whose listed weights hold
three values each, up to the scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle

PARTS = ("experts", "router", "mlp")
TERNARY_JSON = "ternary.json"  # beside a ternary model: which tensors, their zero shares
EPS = 1e-5  # BitNet's floor on the scale: an all-zero matrix stays zero


def absmean_scale(w: torch.Tensor, in_dim: int, per: str, stacked: bool) -> torch.Tensor:
    """The scale s, broadcastable against `w` (module docstring)."""
    if per == "row":
        dims: tuple[int, ...] = (in_dim,)
    elif per == "tensor":
        dims = tuple(range(1, w.dim())) if stacked else tuple(range(w.dim()))
    else:
        raise DeepSeeMoEError(f"per={per!r}: the absmean scale is per 'tensor' or per 'row'")
    return w.abs().mean(dim=dims, keepdim=True).clamp_min(EPS)


def ternarize(w: torch.Tensor, in_dim: int = -1, per: str = "tensor", stacked: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(trits in {−1, 0, 1} as int8, scale s): W_q = trits · s."""
    s = absmean_scale(w.detach().float(), in_dim, per, stacked)
    return torch.clamp(torch.round(w.detach().float() / s), -1, 1).to(torch.int8), s


@dataclass(frozen=True)
class TernaryTarget:
    """One weight tensor to ternarise: `module.<attr>`, its input dimension and whether it is a stack."""

    name: str
    module: nn.Module
    attr: str
    in_dim: int
    stacked: bool


@dataclass(frozen=True)
class TernaryTensor:
    name: str
    shape: tuple[int, ...]
    zero_share: float  # share of trits that are 0
    mean_scale: float

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "zero_share": self.zero_share,
                "mean_scale": self.mean_scale}


def ternary_targets(handle: ModelHandle, parts: tuple[str, ...] = PARTS) -> list[TernaryTarget]:
    """The tensors of `parts` in this model (module docstring); an error when there are none."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise DeepSeeMoEError(f"unknown parts {bad}; choose from {', '.join(PARTS)}")
    out: list[TernaryTarget] = []
    for moe in handle.moe_layers.values():
        if "experts" in parts and moe.experts is not None:
            transposed = bool(getattr(moe.experts, "is_transposed", False))
            for sub, module in moe.experts.named_modules():
                for attr, p in module.named_parameters(recurse=False):
                    if p.dim() == 3:
                        out.append(TernaryTarget(f"{moe.experts_path}.{_join(sub, attr)}", module, attr,
                                                 1 if transposed else 2, True))
                    elif p.dim() == 2:
                        out.append(TernaryTarget(f"{moe.experts_path}.{_join(sub, attr)}", module, attr, 1, False))
        if "router" in parts and moe.router is not None and isinstance(getattr(moe.router, "weight", None),
                                                                        torch.Tensor):
            out.append(TernaryTarget(f"{moe.router_path}.weight", moe.router, "weight", 1, False))
    if "mlp" in parts:
        for mlp in handle.dense_mlps.values():
            for sub, module in mlp.module.named_modules():
                if isinstance(module, nn.Linear):
                    out.append(TernaryTarget(f"{mlp.path}.{_join(sub, 'weight')}", module, "weight", 1, False))
    if not out:
        raise DeepSeeMoEError(f"{handle.name} has no tensors of the parts {', '.join(parts)} "
                              "(experts and router need an MoE, mlp a dense model)")
    return out


def _join(sub: str, attr: str) -> str:
    return f"{sub}.{attr}" if sub else attr


def _tensor(target: TernaryTarget, trits: torch.Tensor, s: torch.Tensor) -> TernaryTensor:
    return TernaryTensor(target.name, tuple(trits.shape), float((trits == 0).float().mean()), float(s.mean()))


def describe(target: TernaryTarget, per: str) -> TernaryTensor:
    return _tensor(target, *ternarize(getattr(target.module, target.attr), target.in_dim, per, target.stacked))


def ternary_record(parts: tuple[str, ...], per: str, tensors: list[TernaryTensor]) -> dict:
    """What ternary.json holds: the parts, the scale rule, each tensor and the share of zero trits over all."""
    sizes = [math.prod(t.shape) for t in tensors]
    zero = sum(t.zero_share * n for t, n in zip(tensors, sizes, strict=True)) / sum(sizes)
    return {"parts": list(parts), "per": per, "zero_share": zero, "tensors": [t.to_dict() for t in tensors]}


@torch.no_grad()
def ternarize_model(handle: ModelHandle, parts: tuple[str, ...] = PARTS, per: str = "tensor") -> list[TernaryTensor]:
    """Replace the weights of `parts` by their absmean ternarisation, in place (post-hoc)."""
    report = []
    for t in ternary_targets(handle, parts):
        w = getattr(t.module, t.attr)
        trits, s = ternarize(w, t.in_dim, per, t.stacked)
        report.append(_tensor(t, trits, s))
        w.copy_((trits.float() * s).to(w.dtype))
    return report


class _AbsmeanSTE(nn.Module):
    """A parametrization: forward W_q, backward the identity (straight through)."""

    def __init__(self, in_dim: int, per: str, stacked: bool):
        super().__init__()
        self.in_dim, self.per, self.stacked = in_dim, per, stacked

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        trits, s = ternarize(w, self.in_dim, self.per, self.stacked)
        q = (trits.to(w.dtype) * s.to(w.dtype)).detach()
        # value exactly W_q (w − w.detach() is exactly 0), gradient exactly the identity; the usual
        # w + (W_q − w).detach() would leave rounding noise in the weights that `bake` writes
        return q + (w - w.detach())


def train_ternary(handle: ModelHandle, parts: tuple[str, ...] = PARTS, per: str = "tensor") -> list[TernaryTarget]:
    """Make the tensors of `parts` ternary in the forward pass from now on (STE); `bake` ends it."""
    targets = ternary_targets(handle, parts)
    for t in targets:
        parametrize.register_parametrization(t.module, t.attr, _AbsmeanSTE(t.in_dim, per, t.stacked))
    return targets


def bake(targets: list[TernaryTarget], per: str = "tensor") -> list[TernaryTensor]:
    """Write W_q into the weights of `train_ternary`'s tensors and drop the parametrizations."""
    for t in targets:
        parametrize.remove_parametrizations(t.module, t.attr, leave_parametrized=True)
    return [describe(t, per) for t in targets]


@torch.no_grad()
def baked_state_dict(model: nn.Module, targets: list[TernaryTarget]) -> dict[str, torch.Tensor]:
    """The state dict `bake` would leave, taken mid-training without touching the model (a checkpoint):
    each parametrized tensor under its plain name, holding W_q. (Baking a deep copy instead would not
    do: parametrization edits the module's class, which a copy shares.)"""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for t in targets:
        state[t.name] = getattr(t.module, t.attr).detach().clone()
    return state


def save_ternary_model(handle: ModelHandle, out: Path, result: dict) -> None:
    """The model, its tokenizer and ternary.json, built beside `out` and swapped in whole, so an
    interrupted run leaves no half-written model folder."""
    from deepseemoe.runs.atomic import atomic_write_json
    from deepseemoe.runs.lock import atomic_dir

    def write(tmp: Path) -> None:
        handle.model.save_pretrained(tmp)
        if handle.tokenizer is not None:
            handle.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TERNARY_JSON, result)

    atomic_dir(out, write)
