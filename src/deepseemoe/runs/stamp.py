"""Stamps: what a cached result was computed from, so that a rerun recomputes only what changed.

A stage that writes results into a folder also writes `.inputs-STAGE.json` there, last: the digest of
everything the results depend on (the inputs' checksums or identities, the settings, and the code
itself). A later run with the same digest, and the stamp's listed outputs present, reuses the
results instead of computing them again. The code is part of the digest (every source file,
template and prompt of the package), so a new version never reuses an older version's numbers.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from deepseemoe.runs.atomic import atomic_write_json


@cache
def code_digest() -> str:
    """sha256 over the package's own files (.py, templates, prompts), in path order."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".j2", ".txt", ".js", ".css")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def digest(**inputs) -> str:
    """One digest of `inputs` (JSON-able values; paths as strings) and the code."""
    doc = json.dumps({"code": code_digest(), **{k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()}},
                     sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def _path(folder: Path, stage: str) -> Path:
    return Path(folder) / f".inputs-{stage}.json"


def fresh(folder: Path, stage: str, key: str, outputs: list[str]) -> bool:
    """`stage`'s results in `folder` were computed from `key` and every one of `outputs` is there."""
    path = _path(folder, stage)
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("key") == key and all((Path(folder) / o).exists() for o in outputs)


def write(folder: Path, stage: str, key: str) -> None:
    """Record, after `stage`'s results are written, what they were computed from."""
    atomic_write_json(_path(folder, stage), {"key": key})


def file_digest(path: Path) -> str:
    from deepseemoe.runs.manifest import sha256_file

    return sha256_file(Path(path))


def model_digest(model_dir: Path) -> str:
    """A model folder's identity: the checksums of its weights and config."""
    model_dir = Path(model_dir)
    return ",".join(file_digest(p) for p in [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json"])
