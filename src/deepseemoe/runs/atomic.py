"""Atomic file writes: every file the project writes appears whole or not at all.

A file is written under a temporary name in its final folder and renamed over the final name
(`os.replace` is atomic within one file system), so a process killed mid-write leaves at most a
hidden `.NAME.*.tmp`, never a truncated file under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_mode() -> int:
    """The mode a plain `open(..., "w")` would give under the current umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_write_table(path: str | Path, table) -> None:
    """A pyarrow table as zstd parquet."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_json(path: str | Path, fix: str) -> Any:
    """A JSON file the project wrote; a missing, truncated or corrupt one is one DeepSeeMoEError that
    names the file and says `fix` (what the user should do)."""
    from deepseemoe.errors import DeepSeeMoEError

    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DeepSeeMoEError(f"{path} is missing; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeepSeeMoEError(f"{path} is damaged (not valid JSON: {exc}); {fix}") from None


def read_safetensors(path: str | Path, fix: str, device: str = "cpu") -> dict:
    """A safetensors file's tensors (never a pickle: safetensors parses no code); a missing,
    truncated, foreign (a pickle under a .safetensors name) or corrupt file is one DeepSeeMoEError
    that names the file and says `fix`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from deepseemoe.errors import DeepSeeMoEError

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise DeepSeeMoEError(f"{path} is missing; {fix}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DeepSeeMoEError(f"{path} is not a readable safetensors file ({why}); {fix}") from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML settings file as a dict ({} when empty); one-line refusals for bad YAML or a non-mapping."""
    import yaml

    from deepseemoe.errors import DeepSeeMoEError

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeepSeeMoEError(f"{path} is not valid YAML ({first}); fix the file") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise DeepSeeMoEError(f"{path} must hold a mapping of settings (key: value), not a {type(d).__name__}")
    return d
