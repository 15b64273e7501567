"""Hooks on a capture site from outside `run_capture`, for forwards that intervene: rewrite the
site's tensor in place of the model's, and record which experts each MoE layer chose.

Shapes: a site tensor [B, S, D] as the module sees it; expert ids [T, K] per call (T = B·S).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

from deepseemoe.capture.core import Site
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle

REWRITABLE = ("resid_in", "resid_out", "block_in", "block_out")


def rewrite_site(handle: ModelHandle, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the site's tensor h by fn(h) in every forward until the returned hook is removed:
    a forward hook on the module's output (…_out), a pre-hook on its input (…_in)."""
    if site.kind not in REWRITABLE:
        raise DeepSeeMoEError(f"site {site.kind} cannot be rewritten; choose from {', '.join(REWRITABLE)}")
    module = handle.site_module(site)
    if site.kind.endswith("_out"):
        def post(mod, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        return module.register_forward_hook(post)

    def pre(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def routing_hooks(handle: ModelHandle, layers: Iterable[int], calls: dict[int, list[torch.Tensor]]) -> list:
    """Observers appending each call's expert ids [T, K] to calls[layer]."""
    hooks = []
    for layer in layers:
        moe = handle.moe_layers[layer]
        hooks += moe.adapter.observe(moe, lambda ev, layer=layer: calls.setdefault(layer, []).append(ev.idx))
    return hooks


@contextlib.contextmanager
def watch_routing(handle: ModelHandle, layers: Iterable[int] | None = None) -> Iterator[dict[int, list[torch.Tensor]]]:
    """{layer: [expert ids of each call, in order]} for the forwards run inside the block."""
    calls: dict[int, list[torch.Tensor]] = {}
    hooks = routing_hooks(handle, sorted(handle.moe_layers) if layers is None else layers, calls)
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()
