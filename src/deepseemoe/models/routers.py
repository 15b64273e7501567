"""Router families: how each router turns logits into (idx, weights), re-implemented so that an
expert can be excluded from the top-k and the router's own rule picks the replacement.

Shapes: logits [T, E]; banned [E] bool; returns idx [T, K] int64, weights [T, K].

A selector called with nothing banned must reproduce the router's own output exactly (tested
for every architecture that has one). Sigmoid/bias routers mask the *choice* scores, not the
weights, because the correction bias selects experts but does not weight them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deepseemoe.errors import DeepSeeMoEError

NEG_INF = float("-inf")


def _masked(scores: torch.Tensor, banned: torch.Tensor | None, fill: float = NEG_INF) -> torch.Tensor:
    if banned is None or not bool(banned.any()):
        return scores
    return scores.masked_fill(banned.to(scores.device), fill)


def _attr(router: nn.Module, *names: str, default=None):
    for n in names:
        if hasattr(router, n):
            return getattr(router, n)
    return default


def softmax_topk(router: nn.Module, logits: torch.Tensor, banned: torch.Tensor | None, *,
                 renorm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over all experts → top-k → optional renormalisation (Mixtral, Qwen-MoE, OLMoE, …)."""
    k = int(_attr(router, "top_k"))
    if renorm is None:
        renorm = bool(_attr(router, "norm_topk_prob", default=False))
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(_masked(probs, banned, -1.0), k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w.to(logits.dtype)


def topk_softmax(router: nn.Module, logits: torch.Tensor,
                 banned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k on the logits → softmax over the k chosen (GPT-OSS, Granite, Aria)."""
    k = int(_attr(router, "top_k"))
    top, idx = torch.topk(_masked(logits.float(), banned), k, dim=-1)
    return idx, torch.softmax(top, dim=-1).to(logits.dtype)


def group_mask(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)
    if group_score == "max":
        scores = grouped.max(dim=-1).values
    else:  # sum of the two best experts per group (DeepSeek-V3)
        scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(scores).scatter_(1, torch.topk(scores, topk_group, dim=-1, sorted=False)[1], 1)
    return keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()


def sigmoid_bias_group(router: nn.Module, logits: torch.Tensor,
                       banned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid; choice = s + correction bias; group limit (Σ top-2 per group);
    top-k on choice; weights = unbiased s, renormalised if asked, × routed_scaling_factor."""
    k = int(router.top_k)
    scores = logits.float().sigmoid()
    choice = scores + router.e_score_correction_bias.float()
    choice = _masked(choice, banned)
    n_group, topk_group = int(router.num_group), int(router.topk_group)
    choice = choice.masked_fill(~group_mask(choice, n_group, topk_group, "sum2"), NEG_INF)
    idx = torch.topk(choice, k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if router.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * router.routed_scaling_factor


def softmax_group_v2(router: nn.Module, logits: torch.Tensor,
                     banned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax; greedy or group-limited greedy (group score = max); no renorm;
    × routed_scaling_factor."""
    k = int(router.top_k)
    scores = _masked(logits.float().softmax(dim=-1), banned, 0.0)
    if router.topk_method == "group_limited_greedy":
        scores = scores.masked_fill(~group_mask(scores, int(router.num_group), int(router.topk_group), "max"), 0.0)
    w, idx = torch.topk(scores, k, dim=-1, sorted=False)
    return idx, w * router.routed_scaling_factor


Selector = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RouterFamily:
    name: str
    selector: Selector | None  # None: ablate / force / random still work, exclude does not


def _always_renorm(router, logits, banned):
    return softmax_topk(router, logits, banned, renorm=True)


def _flag_renorm(router, logits, banned):
    return softmax_topk(router, logits, banned)


# Router classes whose math is verified against the selector (tests/models/test_coverage.py).
ROUTER_FAMILIES: dict[str, RouterFamily] = {
    "MixtralTopKRouter": RouterFamily("softmax_topk_renorm", _always_renorm),
    "MiniMaxTopKRouter": RouterFamily("softmax_topk_renorm", _always_renorm),
    "Qwen2MoeTopKRouter": RouterFamily("softmax_topk", _flag_renorm),
    "Qwen3MoeTopKRouter": RouterFamily("softmax_topk", _flag_renorm),
    "OlmoeTopKRouter": RouterFamily("softmax_topk", _flag_renorm),
    "FlexOlmoTopKRouter": RouterFamily("softmax_topk", _flag_renorm),
    "Qwen3NextTopKRouter": RouterFamily("softmax_topk", _flag_renorm),
    "GptOssTopKRouter": RouterFamily("topk_softmax", topk_softmax),
    "GraniteMoeTopKRouter": RouterFamily("topk_softmax", topk_softmax),
    "GraniteMoeSharedTopKRouter": RouterFamily("topk_softmax", topk_softmax),
    "GraniteMoeHybridTopKRouter": RouterFamily("topk_softmax", topk_softmax),
    "DeepseekV3TopkRouter": RouterFamily("sigmoid_bias_group", sigmoid_bias_group),
    "DeepseekV2TopkRouter": RouterFamily("softmax_group", softmax_group_v2),
}


def _renorm_false(router, logits, banned):
    return softmax_topk(router, logits, banned, renorm=False)


# Tried, in order, on routers not in the table; the first that reproduces the router exactly wins.
_CANDIDATES: tuple[RouterFamily, ...] = (
    RouterFamily("softmax_topk_renorm", _always_renorm),
    RouterFamily("softmax_topk", _renorm_false),
    RouterFamily("topk_softmax", topk_softmax),
    RouterFamily("sigmoid_bias_group", sigmoid_bias_group),
    RouterFamily("softmax_group", softmax_group_v2),
)
_detected: dict[type, RouterFamily] = {}


def _reproduces(family: RouterFamily, router: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            out = router(x)
            if isinstance(out, torch.Tensor) or len(out) < 3:
                return False
            logits, w, idx = out[0], out[1], out[2]
            sel_idx, sel_w = family.selector(router, logits, None)
    except Exception:  # the router needs arguments the block passes, or lacks the family's attributes
        return False
    order, sel_order = idx.argsort(dim=-1), sel_idx.argsort(dim=-1)
    return bool(torch.equal(idx.gather(1, order), sel_idx.gather(1, sel_order))
                and torch.allclose(w.float().gather(1, order), sel_w.float().gather(1, sel_order),
                                   rtol=1e-5, atol=1e-6))


def _materialised(router: nn.Module) -> nn.Module:
    """A CPU copy of a router built on the meta device, with random weights: the family is a property
    of the router's code (which selector reproduces it), so any weights without ties will do."""
    import copy

    real = copy.deepcopy(router).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*real.parameters(), *real.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return real


def detect_family(router: nn.Module, hidden_size: int) -> RouterFamily:
    """Identify a router's family by running it on a random probe input and keeping the first
    candidate selector that reproduces its (idx, weights) exactly."""
    cls = type(router)
    if cls not in _detected:
        param = next(router.parameters(), None)
        if param is not None and param.device.type == "meta":  # a model built without its weights
            router = _materialised(router)
            param = next(router.parameters(), None)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, hidden_size, generator=g)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        _detected[cls] = next((RouterFamily(f.name, f.selector) for f in _CANDIDATES if _reproduces(f, router, x)),
                              RouterFamily(f"other:{cls.__name__}", None))
    return _detected[cls]


def router_family(router: nn.Module | None, hidden_size: int | None = None) -> RouterFamily:
    if router is None:
        return RouterFamily("none", None)
    known = ROUTER_FAMILIES.get(type(router).__name__)
    if known is not None:
        return known
    if hidden_size is None:
        return _detected.get(type(router), RouterFamily(f"other:{type(router).__name__}", None))
    return detect_family(router, hidden_size)


def router_linear(handle, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_r [E, D] and bias [E] (or None) of the linear router of MoE layer `layer` of a `ModelHandle`."""
    moe = handle.moe_layers[layer]
    E = moe.num_experts
    weights = [p for n, p in moe.router.named_parameters() if p.ndim == 2 and p.shape[0] == E]
    biases = [p for n, p in moe.router.named_parameters() if p.ndim == 1 and p.shape[0] == E and "bias" in n]
    if len(weights) != 1:
        raise DeepSeeMoEError(f"layer {layer}: the router has no single [E, D] weight; attribution needs a linear router")
    return weights[0].detach(), (biases[0].detach() if biases else None)
