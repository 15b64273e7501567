"""Latent activations of trained coders over a corpus, written as delphi's latent cache, so its
explainers and scorers (detection, fuzzing) run on our dictionaries unchanged; the same files feed
our own top-activating examples.

Layout (delphi ≥ 0.1, `LatentCache.save_splits` + `save_config`):

    OUT/latents/NAME/{start}_{end}.safetensors   locations [n, 3] (context, position, latent − start)
                                                  uint16/uint32, activations [n] float16,
                                                  tokens [contexts, ctx_len] (the model's input ids)
    OUT/latents/NAME/config.json                  cache settings + model_name

Latents are split into `n_splits` contiguous ranges (inclusive bounds, as delphi names them).
BOS and padding positions never appear in `locations`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from deepseemoe.capture.core import Site
from deepseemoe.dictionaries.coder import Coder
from deepseemoe.dictionaries.stream import model_stream
from deepseemoe.models.handle import ModelHandle
from deepseemoe.runs.lock import atomic_dir


def split_bounds(width: int, n_splits: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, width, n_splits + 1).astype(int)
    return [(int(a), int(b) - 1) for a, b in itertools.pairwise(edges) if b > a]


@torch.no_grad()
def collect_latents(handle: ModelHandle, coder: Coder, sources: list[Site], batches: list, *,
                    progress: bool = False, description: str = "latents") -> dict:
    """Run the corpus through the model and the coder: locations [n, 3] int64 (context, position,
    latent), activations [n] float32, tokens [contexts, S] int64."""
    locs, acts, toks = [], [], []
    offset = 0
    from deepseemoe.progress import track

    for packed in track(batches, description, disable=not progress, unit="batches"):
        (x, _), = next(model_stream(handle, [packed], {"c": (sources, sources[:1])},
                                    device=coder.b_dec.device)).values()
        lat = coder.encode(x.float())
        B, S = packed.input_ids.shape
        keep = packed.keep.nonzero().squeeze(1)
        tok_i, lat_i = (lat > 0).nonzero(as_tuple=True)
        flat = keep[tok_i.cpu()]
        locs.append(torch.stack([flat // S + offset, flat % S, lat_i.cpu()], 1))
        acts.append(lat[tok_i, lat_i].float().cpu())
        toks.append(packed.input_ids)
        offset += B
    return {"locations": torch.cat(locs), "activations": torch.cat(acts), "tokens": torch.cat(toks)}


def save_delphi_cache(path: str | Path, latents: dict, width: int, *, n_splits: int = 5,
                      config: dict | None = None) -> Path:
    """One module's cache folder (see the module docstring)."""
    locations, activations = latents["locations"].numpy(), latents["activations"].numpy()
    tokens = latents["tokens"].numpy().astype(np.int64)

    def write(tmp: Path) -> None:
        for start, end in split_bounds(width, n_splits):
            mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
            loc = locations[mask].copy()
            loc[:, 2] -= start
            small = loc.size == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16 and loc[:, 1].max() < 2**16)
            save_file({"locations": loc.astype(np.uint16 if small else np.uint32),
                       "activations": activations[mask].astype(np.float16), "tokens": tokens},
                      str(tmp / f"{start}_{end}.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**(config or {}), "n_splits": n_splits, "width": width},
                                                    indent=2))

    return atomic_dir(Path(path), write)
