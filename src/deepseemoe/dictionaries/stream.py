"""Activation streams for the coder trainer: from a live model (one forward feeds every coder)
or from tensors already in memory.

Shapes: each item is {coder name: (source [T, D_in], target [T, D_out])}, T = kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from deepseemoe.capture.consumers import ActivationCollector
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.data.tokens import PackedBatch
from deepseemoe.models.handle import ModelHandle

SiteGroup = Site | Sequence[Site]


def _as_list(group: SiteGroup) -> list[Site]:
    return [group] if isinstance(group, Site) else list(group)


def model_stream(handle: ModelHandle, batches: Iterable[PackedBatch], pairs: dict[str, tuple[SiteGroup, SiteGroup]],
                 device: str | torch.device = "cpu", on_capture: Callable[[dict[Site, torch.Tensor]], None] | None = None
                 ) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Capture every (source, target) pair with one forward per batch; a list of sites is
    concatenated along the feature axis (crosscoders, CLTs). Tensors are moved to `device` (the
    coders' device), so the model can live on another one. `on_capture` sees each batch's raw
    site tensors (the activation cache writer)."""
    sites = sorted({s for pair in pairs.values() for g in pair for s in _as_list(g)}, key=lambda s: (s.layer, s.kind))
    collector = ActivationCollector(sites, device=device)
    for packed in batches:
        run_capture(handle, packed.input_ids, [collector], attention_mask=packed.attention_mask, keep=packed.keep)
        got = {s: collector.chunks[s].pop() for s in sites}
        if on_capture is not None:
            on_capture(got)

        def cat(group: SiteGroup, got=got) -> torch.Tensor:
            parts = [got[s] for s in _as_list(group)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        yield {name: (cat(src), cat(tgt)) for name, (src, tgt) in pairs.items()}


def tensor_stream(source: torch.Tensor, target: torch.Tensor | None = None, *, name: str = "coder",
                  chunk: int = 1024) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    target = source if target is None else target
    for i in range(0, len(source), chunk):
        yield {name: (source[i:i + chunk], target[i:i + chunk])}
