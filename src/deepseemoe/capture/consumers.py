"""Ready-made consumers of `run_capture`.

Shapes: routing ids/weights [T, K] per MoE layer, logits [T, E]; activations [T, D].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from deepseemoe.capture.core import CaptureBatch, Site


class RoutingRecorder:
    """Keeps every batch's routing (ids, weights, optionally router logits) per MoE layer, on CPU."""

    def __init__(self, layers: Iterable[int], logits: bool = False):
        self.layers = sorted(layers)
        self.sites = [Site("routing", layer) for layer in self.layers]
        if logits:
            self.sites += [Site("router_logits", layer) for layer in self.layers]
        self.logits = logits
        self.batches: list[dict] = []

    def consume(self, batch: CaptureBatch) -> None:
        record = {"token_ids": batch.token_ids.cpu(), "mask": batch.mask.cpu(), "batch_shape": batch.batch_shape,
                  "idx": {i: batch[Site("routing", i)].cpu() for i in self.layers},
                  "weights": {i: batch.routing_weights[i].float().cpu() for i in self.layers}}
        if self.logits:
            record["logits"] = {i: batch[Site("router_logits", i)].float().cpu() for i in self.layers}
        self.batches.append(record)

    def clear(self) -> None:
        self.batches.clear()


class ActivationCollector:
    """Accumulates the activations of some sites, moved to `device` and cast to `dtype`."""

    def __init__(self, sites: Iterable[Site], device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.sites = list(sites)
        self.device, self.dtype = torch.device(device), dtype
        self.chunks: dict[Site, list[torch.Tensor]] = {s: [] for s in self.sites}

    def consume(self, batch: CaptureBatch) -> None:
        for s in self.sites:
            t = batch[s].to(self.device)
            self.chunks[s].append(t if self.dtype is None else t.to(self.dtype))

    def tensor(self, site: Site) -> torch.Tensor:
        return torch.cat(self.chunks[site]) if self.chunks[site] else torch.empty(0)
