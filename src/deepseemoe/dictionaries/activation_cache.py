"""An on-disk activation cache: capture once, train many dictionaries (or sweep hyper-parameters)
without running the model again.

    DIR/manifest.json          key (model, corpus, ctx_len, batch_size, sites, dtype), shards with
                               their token counts and sha256, complete: true once finished
    DIR/shard_00000.safetensors   one tensor per site, "KIND@LAYER" → [T, D] (T = kept tokens)

Shards are written atomically as they fill; the manifest is rewritten after each one, so a killed
capture leaves a valid prefix and `complete: false`. Reading checks every shard's checksum, and a
cache whose key does not match the run is refused rather than silently reused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from deepseemoe.capture.core import Site
from deepseemoe.dictionaries.stream import SiteGroup, _as_list
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_bytes, atomic_write_json, read_json

MANIFEST = "manifest.json"


def site_key(site: Site) -> str:
    return f"{site.kind}@{site.layer}"


def cache_state(path: str | Path, key: dict) -> str:
    """'missing', 'complete' or 'partial' for this key; a different key is an error."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        return "missing"
    doc = read_json(manifest, "delete the cache folder and train again to rebuild it")
    if doc["key"] != key:
        diff = sorted(k for k in set(key) | set(doc["key"]) if key.get(k) != doc["key"].get(k))
        raise DeepSeeMoEError(f"activation cache {path} was captured with other settings ({', '.join(diff)}); "
                              "use another folder or delete it")
    return "complete" if doc["complete"] else "partial"


class ActivationCacheWriter:
    def __init__(self, path: str | Path, key: dict, sites: list[Site], shard_tokens: int = 65_536,
                 dtype: torch.dtype = torch.float32):
        self.path, self.key, self.sites = Path(path), key, sites
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.pending: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
        self.pending_tokens = 0
        self.items: list[int] = []  # tokens per captured batch, so reading replays the same items
        self.shards: list[dict] = []
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest(complete=False)

    def add(self, got: dict[Site, torch.Tensor]) -> None:
        for s in self.sites:
            self.pending[s].append(got[s].detach().to("cpu", self.dtype))
        self.pending_tokens += got[self.sites[0]].shape[0]
        self.items.append(got[self.sites[0]].shape[0])
        if self.pending_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.pending_tokens:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        data = save({site_key(s): torch.cat(self.pending[s]).contiguous() for s in self.sites})
        atomic_write_bytes(self.path / name, data)
        self.shards.append({"file": name, "tokens": self.pending_tokens, "items": self.items,
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.pending = {s: [] for s in self.sites}
        self.pending_tokens = 0
        self.items = []
        self._manifest(complete=False)

    def _manifest(self, complete: bool) -> None:
        atomic_write_json(self.path / MANIFEST, {"format": "deepseemoe-activations/1", "key": self.key,
                                                 "sites": [site_key(s) for s in self.sites],
                                                 "shards": self.shards, "complete": complete})

    def close(self) -> None:
        self._flush()
        self._manifest(complete=True)


def cached_stream(path: str | Path, pairs: dict[str, tuple[SiteGroup, SiteGroup]], device: str | torch.device = "cpu"
                  ) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The items `model_stream` yielded when the cache was written (same order, same sizes), so a
    run on the cache trains exactly like the run that captured it."""
    path = Path(path)
    doc = read_json(path / MANIFEST, "delete the cache folder and train again to rebuild it")
    if not doc["complete"]:
        raise DeepSeeMoEError(f"activation cache {path} is incomplete (the capture was interrupted); delete it "
                              "and capture again")
    needed = {site_key(s) for pair in pairs.values() for g in pair for s in _as_list(g)}
    missing = needed - set(doc["sites"])
    if missing:
        raise DeepSeeMoEError(f"activation cache {path} lacks sites {sorted(missing)}; it holds {doc['sites']}")
    for shard in doc["shards"]:
        raw = (path / shard["file"]).read_bytes()
        if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
            raise DeepSeeMoEError(f"{path / shard['file']} does not match its checksum; delete the cache and "
                                  "capture again")
        tensors = load_file(path / shard["file"])
        start = 0
        for n in shard["items"]:
            def cat(group: SiteGroup, a=start, b=start + n, tensors=tensors) -> torch.Tensor:
                parts = [tensors[site_key(s)][a:b].to(device) for s in _as_list(group)]
                return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

            yield {name: (cat(src), cat(tgt)) for name, (src, tgt) in pairs.items()}
            start += n
