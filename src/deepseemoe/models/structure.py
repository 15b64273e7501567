"""A model's MoE structure as `inspect` prints it, and a cache of it keyed by the model's config.

Finding the structure means importing torch, transformers and the model's modeling code and building
the model on the meta device: 4 s or more on a small machine, where reading a table takes
milliseconds. So the structure of a local folder is kept under `$DEEPSEEMOE_CACHE/structure/`,
keyed by the sha256 of its config.json, the transformers version and DeepSeeMoE's own code (discovery
may change with either); any change of those computes it again. A model built by its own code
(`--trust-remote-code`) is never cached: its code, not its config, decides the structure.
This module imports neither torch nor transformers: a cached `inspect` stays under half a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from deepseemoe.runs.atomic import atomic_write_json

COLUMNS = ("layer", "kind", "experts", "top-k", "router family", "combine", "shared", "notes")


@dataclass
class Structure:
    name: str
    model_type: str
    num_layers: int
    is_moe: bool
    rows: list[list[str]]  # one per decoder layer, in COLUMNS order

    @property
    def title(self) -> str:
        return f"{self.name} ({self.model_type}): {self.num_layers} layers, {'MoE' if self.is_moe else 'dense'}"


def structure_of(handle) -> Structure:
    """The rows `inspect` shows, from a loaded (or meta-device) ModelHandle."""
    rows = []
    for i in range(handle.num_layers):
        moe = handle.moe_layers.get(i)
        if moe is not None:
            rows.append([str(i), "MoE", str(moe.num_experts), str(moe.top_k), moe.router_family, moe.combine,
                         ", ".join(moe.shared_paths) or "-", "; ".join(moe.notes) or ""])
        elif i in handle.dense_mlps:
            rows.append([str(i), "dense MLP", f"{handle.dense_mlps[i].num_neurons} neurons", "-", "-", "-", "-", ""])
        else:
            rows.append([str(i), "other", "-", "-", "-", "-", "-", ""])
    return Structure(handle.name, handle.model_type, handle.num_layers, handle.is_moe, rows)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def cache_key(model: str, trust_remote_code: bool) -> str | None:
    """The key of a local model folder's structure; None for anything else (a hub id, a tiny: model)
    and for a model whose own code builds it (`--trust-remote-code`: that code, not the config, says
    what the structure is, and the user asked for it to run)."""
    from deepseemoe.runs.stamp import code_digest

    config = Path(model).expanduser() / "config.json"
    if trust_remote_code or not config.is_file():
        return None
    h = hashlib.sha256(config.read_bytes())
    h.update(json.dumps([_version("transformers"), code_digest()]).encode())  # discovery changes with either
    return h.hexdigest()


def _cache_dir() -> Path:
    from deepseemoe.zoo.train import default_cache_dir  # light: no torch

    return default_cache_dir() / "structure"


def cached_structure(model: str, key: str) -> Structure | None:
    """The cached structure of KEY, shown under the name MODEL was given by; None when absent or not
    readable as one (a damaged entry is computed again, never trusted)."""
    try:
        doc = json.loads((_cache_dir() / f"{key}.json").read_bytes())
        s = Structure(**doc["structure"])
        if doc.get("key") != key or not all(isinstance(r, list) and len(r) == len(COLUMNS) for r in s.rows) \
                or len(s.rows) != s.num_layers:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    s.name = model
    return s


def save_structure(key: str, structure: Structure) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs the next call its speed
        atomic_write_json(_cache_dir() / f"{key}.json", {"key": key, "structure": asdict(structure)})
