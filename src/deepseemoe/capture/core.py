"""One forward pass, many consumers.

Shapes: input_ids [B, S]; every captured tensor is token-flattened batch-major to [T, ·] and
then filtered by the token mask (padding, and BOS by choice, removed), so consumers see
[T_kept, ·]: resid/block tensors [T, D], router logits [T, E], routing idx/weights [T, K],
per-expert outputs [T, K, D], dense neurons [T, F].

Consumers declare `sites`; only the hooks those sites need are registered, and the forward
stops right after the last decoder layer any site needs (unless a consumer wants the final
logits), which is where most of the saving on deep models comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle, RoutingEvent

SITE_KINDS = (
    "resid_in",  # decoder layer input [T, D]
    "resid_out",  # decoder layer output [T, D]
    "block_in",  # MoE block (or dense MLP) input [T, D]
    "block_out",  # MoE block (or dense MLP) output [T, D]
    "router_logits",  # [T, E]
    "routing",  # expert ids [T, K] (as "routing") and weights [T, K] (as "routing_weights")
    "expert_out",  # unweighted outputs of the chosen experts [T, K, D]
    "mlp_neurons",  # dense MLP hidden activations [T, F]
    "logits",  # final LM logits [T, V] (layer ignored; disables early stopping)
)


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int = -1

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise DeepSeeMoEError(f"unknown capture site {self.kind!r}; choose from {', '.join(SITE_KINDS)}")


@dataclass
class CaptureBatch:
    """What one forward produced, already masked to the kept tokens."""

    tensors: dict[Site, torch.Tensor]
    mask: torch.Tensor  # [B*S] bool: which flattened positions were kept
    token_ids: torch.Tensor  # [T] ids of the kept tokens
    batch_shape: tuple[int, int]  # (B, S)
    routing_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, K]

    def __getitem__(self, site: Site) -> torch.Tensor:
        return self.tensors[site]


class Consumer(Protocol):
    sites: Sequence[Site]

    def consume(self, batch: CaptureBatch) -> None: ...


class _StopForward(Exception):
    """Raised by the hook of the last needed layer to skip the rest of the model."""


def token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               bos_token_id: int | None, exclude_bos: bool) -> torch.Tensor:
    """[B, S] → [B*S] bool: real tokens, without BOS when asked."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if exclude_bos and bos_token_id is not None:
        keep = keep & (input_ids != bos_token_id)
    return keep.reshape(-1)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class _Recorder:
    """Registers the hooks a set of sites needs and keeps their raw [B*S, ·] tensors."""

    def __init__(self, handle: ModelHandle, sites: set[Site]):
        self.handle, self.sites = handle, sites
        self.raw: dict[Site, torch.Tensor] = {}
        self.routing_weights: dict[int, torch.Tensor] = {}
        self.hooks: list = []
        self.stop_after: int | None = None

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.shape[-1])

    def install(self, stop_early: bool) -> None:
        h = self.handle
        by_layer: dict[int, set[str]] = {}
        for s in self.sites:
            by_layer.setdefault(s.layer, set()).add(s.kind)
        for layer, kinds in by_layer.items():
            if layer == -1:
                continue
            if not 0 <= layer < h.num_layers:
                raise DeepSeeMoEError(f"layer {layer} does not exist; the model has layers 0..{h.num_layers - 1}")
            for kind in ("resid_in", "block_in", "mlp_neurons"):  # tensors a module reads
                if kind in kinds:
                    module = h.site_module(Site(kind, layer))
                    self.hooks.append(module.register_forward_pre_hook(self._store_pre(Site(kind, layer)),
                                                                        with_kwargs=True))
            for kind in ("resid_out", "block_out"):  # tensors a module writes
                if kind in kinds:
                    self.hooks.append(h.site_module(Site(kind, layer)).register_forward_hook(
                        self._store_out(Site(kind, layer))))
            moe_kinds = kinds & {"router_logits", "routing", "expert_out"}
            if moe_kinds:
                moe = h.moe_layers.get(layer)
                if moe is None:
                    raise DeepSeeMoEError(f"layer {layer} is not an MoE layer; MoE layers: {sorted(h.moe_layers)}")
                self.hooks += moe.adapter.observe(moe, self._store_routing(layer, moe_kinds))
        needed = [s.layer for s in self.sites if s.layer >= 0]
        if stop_early and needed and not any(s.kind == "logits" for s in self.sites):
            self.stop_after = max(needed)
            if self.stop_after < h.num_layers - 1:
                self.hooks.append(h.layers[self.stop_after].register_forward_hook(self._stop))

    def _store_pre(self, site: Site):
        def hook(module, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("hidden_states")
            self.raw[site] = self._flat(x)
        return hook

    def _store_out(self, site: Site):
        def hook(module, args, out):
            self.raw[site] = self._flat(_first(out))
        return hook

    def _store_routing(self, layer: int, kinds: set[str]):
        def callback(ev: RoutingEvent) -> None:
            if "routing" in kinds:
                self.raw[Site("routing", layer)] = ev.idx.detach()
                self.routing_weights[layer] = ev.weights.detach()
            if "router_logits" in kinds and ev.logits is not None:
                self.raw[Site("router_logits", layer)] = ev.logits.detach()
            if "expert_out" in kinds:
                moe = self.handle.moe_layers[layer]
                self.raw[Site("expert_out", layer)] = moe.adapter.expert_outputs(moe, ev.x, ev.idx).detach()
        return callback

    def _stop(self, module, args, out):
        raise _StopForward

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


@torch.no_grad()
def run_capture(handle: ModelHandle, input_ids: torch.Tensor, consumers: Sequence[Consumer], *,
                attention_mask: torch.Tensor | None = None, exclude_bos: bool = True,
                stop_early: bool = True, keep: torch.Tensor | None = None) -> CaptureBatch:
    """Run one forward on `input_ids` [B, S] and hand every consumer its sites, masked by `keep`
    [B*S] (a packed batch's `keep`); without it, real tokens minus BOS (`exclude_bos`) by id."""
    sites = {s for c in consumers for s in c.sites}
    model = handle.model
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    recorder = _Recorder(handle, sites)
    recorder.install(stop_early)
    try:
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            if any(s.kind == "logits" for s in sites):
                recorder.raw[Site("logits")] = out.logits.detach().reshape(-1, out.logits.shape[-1])
        except _StopForward:
            pass
    finally:
        recorder.remove()
    if keep is not None:
        mask = keep.to(input_ids.device)
    else:  # the BOS the tokenizer adds; a handle without tokenizer has only its config's
        source = handle.tokenizer if handle.tokenizer is not None else getattr(model, "config", None)
        mask = token_mask(input_ids, attention_mask, getattr(source, "bos_token_id", None), exclude_bos)
    kept = {site: t[mask.to(t.device)] for site, t in recorder.raw.items()}
    batch = CaptureBatch(tensors=kept, mask=mask, token_ids=input_ids.reshape(-1)[mask],
                         batch_shape=tuple(input_ids.shape),
                         routing_weights={k: w[mask.to(w.device)] for k, w in recorder.routing_weights.items()})
    missing = sites - set(kept)
    if missing:
        raise DeepSeeMoEError(f"the forward did not produce {sorted(map(str, missing))}; the model's hooks never "
                              "fired for them (a hub kernel may have replaced the block forward)")
    for consumer in consumers:
        consumer.consume(batch)
    return batch
