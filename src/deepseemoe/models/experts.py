"""The experts module's call convention and per-expert recomputation.

Shapes: x [T, D], idx [T, K] int64, weights [T, K], per-expert outputs [T, K, D], neurons [T, F].

Fused experts (3-D parameters, grouped_mm by default) hide per-expert math from hooks, so
unweighted expert outputs are recomputed by re-calling the experts module with one expert per
row and unit weight. Hooks of ours must not fire during that re-call: they check
`hooks_bypassed()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

IDX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices", "top_k_indices")
WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores", "topk_weights")

_state = threading.local()


def hooks_bypassed() -> bool:
    """True while an internal recomputation runs; capture and intervention hooks then do nothing."""
    return getattr(_state, "bypass", 0) > 0


@contextlib.contextmanager
def bypass_hooks() -> Iterator[None]:
    _state.bypass = getattr(_state, "bypass", 0) + 1
    try:
        yield
    finally:
        _state.bypass -= 1


def unpack_experts_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, idx, weights) from a call `experts(hidden_states, top_k_index, top_k_weights)`,
    whether the arguments were passed by position or by name."""
    x = args[0] if args else kwargs["hidden_states"]
    idx = args[1] if len(args) > 1 else next(kwargs[n] for n in IDX_NAMES if n in kwargs)
    w = args[2] if len(args) > 2 else next(kwargs[n] for n in WEIGHT_NAMES if n in kwargs)
    return x, idx, w


def repack_experts_call(args: tuple, kwargs: dict[str, Any], idx: torch.Tensor,
                        weights: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """The same call with (idx, weights) replaced, in the positions they came in."""
    args = list(args)
    kwargs = dict(kwargs)
    if len(args) > 1:
        args[1] = idx
    else:
        kwargs[next(n for n in IDX_NAMES if n in kwargs)] = idx
    if len(args) > 2:
        args[2] = weights
    else:
        kwargs[next(n for n in WEIGHT_NAMES if n in kwargs)] = weights
    return tuple(args), kwargs


def recall_expert_outputs(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Unweighted outputs E_{idx[t,k]}(x_t) by re-calling the experts module: [T, K, D].

    Works for every experts implementation (eager, grouped_mm, batched_mm) because it goes
    through the module's own forward with one expert per row and weight 1.
    """
    T, K = idx.shape
    x_rep = x.reshape(T, -1).repeat_interleave(K, dim=0)  # [T*K, D]
    flat_idx = idx.reshape(-1, 1)
    ones = torch.ones(flat_idx.shape, dtype=x.dtype, device=x.device)
    with bypass_hooks(), torch.no_grad():
        try:
            y = experts(x_rep, flat_idx, ones)
        except ValueError:
            # Some experts modules (Longcat-Flash) cannot take one expert per row: add a second
            # slot with the same expert and weight 0, which contributes nothing.
            y = experts(x_rep, flat_idx.repeat(1, 2), torch.cat([ones, torch.zeros_like(ones)], dim=1))
    return y.reshape(T, K, -1)


def has_fused_layout(experts: nn.Module) -> bool:
    """Experts decorated by transformers' `use_experts_implementation` carry these layout flags."""
    return all(hasattr(experts, a) for a in ("has_gate", "has_bias", "is_transposed", "down_proj"))


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """One expert's projection in the fused layout ([in, out] when transposed, else [out, in])."""
    out = x @ weight if transposed else x @ weight.T
    return out + bias if bias is not None else out


def fused_expert_neurons(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Hidden activations (the down projection's input) of one fused expert: [T, D] -> [T, F]."""
    if not has_fused_layout(experts):
        raise NotImplementedError(f"{type(experts).__name__} has no fused-experts layout flags")
    transposed = bool(experts.is_transposed)
    if experts.has_gate:  # the module's own gate rule reads its own layout (concatenated or interleaved)
        bias = experts.gate_up_proj_bias[expert] if experts.has_bias else None
        h = fused_linear(x, experts.gate_up_proj[expert], bias, transposed)
        return experts._apply_gate(h)
    bias = experts.up_proj_bias[expert] if experts.has_bias else None
    return experts.act_fn(fused_linear(x, experts.up_proj[expert], bias, transposed))


def fused_expert_output_from_neurons(experts: nn.Module, h: torch.Tensor, expert: int) -> torch.Tensor:
    """The expert's output from its hidden activations: [T, F] -> [T, D]."""
    bias = experts.down_proj_bias[expert] if experts.has_bias else None
    out = fused_linear(h, experts.down_proj[expert], bias, bool(experts.is_transposed))
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def fused_expert_width(experts: nn.Module) -> int:
    """Hidden units per expert of a fused experts module (the down projection's input size)."""
    down = experts.down_proj  # [E, F, D] when transposed, else [E, D, F]
    return int(down.shape[1] if experts.is_transposed else down.shape[2])


@contextlib.contextmanager
def silenced_expert_neurons(experts: nn.Module, expert: torch.Tensor, neuron: torch.Tensor) -> Iterator[None]:
    """While entered, the down-projection weights of the hidden units (expert[j], neuron[j]) of a fused
    experts module are 0, so those units write nothing; restored on exit."""
    down = experts.down_proj
    rows = down if experts.is_transposed else down.transpose(1, 2)  # a view [E, F, D] of the same storage
    with torch.no_grad():
        old = rows[expert, neuron, :].clone()
        rows[expert, neuron, :] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            rows[expert, neuron, :] = old
