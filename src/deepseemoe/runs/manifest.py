"""The manifest of a run directory: every file with its byte size, row count and sha256.

`manifest.json` is written last, after every file it lists is whole, so a run without one (or
with one that does not list a file) is incomplete. Readers check sizes when they open a run and
the sha256 of every byte they read, so a truncated or bit-flipped file is refused in one line
naming it, never summarised.

    {"format": "deepseemoe-run/1", "kind": "routing", "created": ISO time,
     "files": {"tokens/part-00000.parquet": {"bytes": N, "rows": R, "sha256": HEX}, …}}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_bytes

FORMAT = "deepseemoe-run/1"
NAME = "manifest.json"
_CHUNK = 1 << 22


# (resolved path, bytes, mtime_ns) -> sha256 of the files this process has hashed
_HASHED: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str
    rows: int | None = None  # parquet files: their row count


@dataclass
class Manifest:
    kind: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    created: str = ""

    def add(self, root: Path, rel: str, rows: int | None = None) -> None:
        path = root / rel
        self.files[rel] = FileEntry(path.stat().st_size, sha256_file(path), rows)

    def write(self, root: Path) -> str:
        """Write `root/manifest.json` (atomically, last); returns its sha256 (the run's identity)."""
        self.created = self.created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        doc = {"format": FORMAT, "kind": self.kind, "created": self.created,
               "files": {k: {kk: vv for kk, vv in vars(v).items() if vv is not None}
                         for k, v in sorted(self.files.items())}}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        atomic_write_bytes(root / NAME, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def read(cls, root: Path, kind: str) -> tuple[Manifest, str]:
        """The manifest of `root` and its sha256; one-line refusals for a missing or damaged one."""
        path = root / NAME
        if not path.exists():
            raise DeepSeeMoEError(f"{root} has no {NAME}: the run is incomplete (interrupted, or written by an "
                                  "older version); write it again")
        data = path.read_bytes()
        try:
            doc = json.loads(data)
            files = {k: FileEntry(int(v["bytes"]), str(v["sha256"]), v.get("rows")) for k, v in doc["files"].items()}
            found_kind = doc["kind"]
            ok = doc["format"] == FORMAT
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DeepSeeMoEError(f"{path} is damaged (not a DeepSeeMoE manifest); write the run again") from None
        if not ok or found_kind != kind:
            raise DeepSeeMoEError(f"{root} is a {found_kind!r} run, not a {kind!r} run; pass a {kind} run directory")
        return cls(kind, files, doc.get("created", "")), hashlib.sha256(data).hexdigest()

    def check_sizes(self, root: Path) -> None:
        """Cheap check on open: every listed file is there with its size (catches truncation)."""
        for rel, entry in self.files.items():
            path = root / rel
            if not path.exists():
                raise DeepSeeMoEError(f"{path} is missing from the run (its manifest lists it); write the run again")
            size = path.stat().st_size
            if size != entry.bytes:
                raise DeepSeeMoEError(f"{path} is damaged: {size} bytes where the manifest says {entry.bytes}; "
                                      "write the run again")

    def verified_bytes(self, root: Path, rel: str) -> bytes:
        """The bytes of one listed file, after checking them against its sha256."""
        entry = self.files.get(rel)
        path = root / rel
        if entry is None:
            raise DeepSeeMoEError(f"{path} is not listed in {root / NAME}; it does not belong to the run")
        data = path.read_bytes()
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DeepSeeMoEError(f"{path} is damaged: its checksum does not match the run's manifest; "
                                  "write the run again")
        return data

    def verify_file(self, root: Path, rel: str) -> Path:
        """Check one listed file's sha256 without keeping its bytes; returns its path. A file this
        process hashed already, unchanged since (same size and modification time), is not hashed again."""
        entry = self.files.get(rel)
        path = root / rel
        if entry is None:
            raise DeepSeeMoEError(f"{path} is not listed in {root / NAME}; it does not belong to the run")
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if _HASHED.get(key) == entry.sha256:
            return path
        digest = sha256_file(path) if st.st_size == entry.bytes else None
        if digest is not None:
            _HASHED[key] = digest
        if digest != entry.sha256:
            raise DeepSeeMoEError(f"{path} is damaged: its checksum does not match the run's manifest; "
                                  "write the run again")
        return path
