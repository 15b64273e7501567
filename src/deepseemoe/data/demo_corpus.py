"""The offline demo corpus: real multi-domain text found on the machine, no hub needed.

Domains and where they come from (each source is optional except the Python stdlib):
  code  Python standard-library sources (always present)
  en    World English Bible (sword-text-web + diatheke), English fortunes
  de    German fortunes (fortunes-de)
  es    Reina-Valera 1909 (sword-text-sparv + diatheke), Spanish fortunes (fortunes-es)
  ru    Russian fortunes (fortunes-ru)
  data  iso-codes JSON records, UnicodeData.txt
`scripts/setup.sh` installs the Debian packages when it runs as root. Package files are taken
from `dpkg -L`, not from globbing, so only the named package's text is used. Output:
`train.jsonl` and `val.jsonl` (`text`, `domain`, `source`) and `report.json`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deepseemoe.runs.atomic import atomic_write_bytes, atomic_write_json

DOMAINS = ("code", "en", "de", "es", "ru", "data")
# words a description of text from each domain would use to name it (lower case; matched as words)
DOMAIN_WORDS = {"code": ("code", "python", "program", "programming", "function", "functions", "software"),
                "en": ("english",), "de": ("german", "deutsch"), "es": ("spanish", "español", "espanol"),
                "ru": ("russian", "cyrillic"),
                "data": ("data", "json", "iso", "unicode", "structured", "table", "codes")}
DEBIAN_PACKAGES = ("fortunes", "fortunes-de", "fortunes-es", "fortunes-ru", "sword-text-web", "sword-text-sparv",
                   "diatheke", "iso-codes", "unicode-data")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class CorpusReport:
    out_dir: Path
    domains: dict[str, dict] = field(default_factory=dict)  # domain -> docs/bytes per split, sources
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def chunk_text(text: str, size: int = 2000, min_chars: int = 80) -> list[str]:
    """Split text into ~`size`-character documents on paragraph (blank-line) boundaries."""
    docs, current, length = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        current.append(para)
        length += len(para)
        if length >= size:
            docs.append("\n\n".join(current))
            current, length = [], 0
    if current:
        docs.append("\n\n".join(current))
    return [d for d in docs if len(d) >= min_chars]


def split_fortunes(text: str) -> list[str]:
    """Fortune files hold quotes separated by lines holding only '%'."""
    return [q.strip() for q in re.split(r"^%\s*$", _ANSI.sub("", text), flags=re.M) if len(q.strip()) >= 40]


def group(items: list[str], n: int, sep: str = "\n") -> list[str]:
    return [sep.join(items[i:i + n]) for i in range(0, len(items), n)]


def dpkg_files(package: str) -> list[Path]:
    if shutil.which("dpkg") is None:
        return []
    proc = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [Path(p) for p in proc.stdout.splitlines() if Path(p).is_file()]


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    text = data.decode("utf-8", errors="replace")
    return text if text.count("\ufffd") < 0.01 * max(len(text), 1) else ""


# ---- sources: each yields documents of one domain --------------------------------------------

def stdlib_code(root: Path | None = None) -> Iterator[str]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel):
            continue
        try:
            yield from chunk_text(path.read_text(encoding="utf-8"), size=2500)
        except (UnicodeDecodeError, OSError):
            continue


def fortunes(package: str, subdir: str | None) -> Iterator[str]:
    for path in sorted(dpkg_files(package)):
        if path.suffix in (".dat", ".u8") or path.name.startswith("."):
            continue
        parts = path.parts
        # the quotes live under .../games/fortunes/; the package's doc folder (changelogs) does not count
        if "games" not in parts or "fortunes" not in parts or "off" in parts or "ascii" in path.name:
            continue
        parent = parts[parts.index("fortunes") + 1] if parts.index("fortunes") + 1 < len(parts) - 1 else None
        if parent != subdir:  # fortunes-it/-zh drop files at the top level too: keep only this package's dir
            continue
        yield from group(split_fortunes(_read(path)), 6, sep="\n\n")


def bible(module: str) -> Iterator[str]:
    if shutil.which("diatheke") is None:
        return
    proc = subprocess.run(["diatheke", "-b", module, "-f", "plain", "-k", "Genesis 1:1-Revelation 22:21"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout.strip():
        return
    verses = [re.sub(r"^[1-3]? ?[A-Za-zÀ-ÿ ]+ \d+:\d+:\s*", "", line) for line in proc.stdout.splitlines()
              if re.match(r"^[1-3]? ?[A-Za-zÀ-ÿ ]+ \d+:\d+:", line)]
    yield from group(verses, 12, sep=" ")


def iso_codes() -> Iterator[str]:
    for path in sorted(dpkg_files("iso-codes")):
        if path.suffix == ".json" and "/json/" in str(path):
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            for key, records in obj.items():
                if isinstance(records, list):
                    for i in range(0, len(records), 8):
                        yield json.dumps({key: records[i:i + 8]}, ensure_ascii=False, indent=1)


def unicode_data() -> Iterator[str]:
    for path in dpkg_files("unicode-data"):
        if path.name == "UnicodeData.txt":
            yield from group(path.read_text(encoding="utf-8").splitlines(), 40)


SOURCES: dict[str, list[tuple[str, Callable[[], Iterator[str]]]]] = {
    "code": [("python-stdlib", stdlib_code)],
    "en": [("sword-text-web", lambda: bible("engWEB2015eb")), ("fortunes", lambda: fortunes("fortunes", None))],
    "de": [("fortunes-de", lambda: fortunes("fortunes-de", "de"))],
    "es": [("sword-text-sparv", lambda: bible("spaRV1909eb")), ("fortunes-es", lambda: fortunes("fortunes-es", "es"))],
    "ru": [("fortunes-ru", lambda: fortunes("fortunes-ru", "ru"))],
    "data": [("iso-codes", iso_codes), ("unicode-data", unicode_data)],
}


def build_corpus(out_dir: str | Path, *, seed: int = 0, max_bytes_per_domain: int = 2_500_000,
                 val_fraction: float = 0.05, sources: dict | None = None, progress: bool = False) -> CorpusReport:
    """Collect, deduplicate and split the demo corpus into `out_dir` (train.jsonl, val.jsonl)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = CorpusReport(out_dir, seed=seed)
    rng = random.Random(seed)
    seen: set[bytes] = set()
    train, val = [], []
    from deepseemoe.progress import track

    for domain, domain_sources in track(list((sources or SOURCES).items()), "collecting domains",
                                        disable=not progress, unit="domains"):
        # equal byte share per source; a source smaller than its share passes the rest on
        budget = max_bytes_per_domain
        docs: list[dict] = []
        used_sources: dict[str, int] = {}
        for i, (name, fn) in enumerate(domain_sources):
            share = budget // (len(domain_sources) - i)
            # read up to 4× the share, then sample: keeps big sources (the stdlib) fast to scan
            texts, pool_bytes = [], 0
            for t in fn():
                if t.strip():
                    texts.append(t)
                    pool_bytes += len(t)
                    if pool_bytes >= 4 * share:
                        break
            rng.shuffle(texts)
            taken = 0
            for text in texts:
                digest = hashlib.sha1(text.encode()).digest()
                if digest in seen:
                    continue
                if taken + len(text.encode()) > share:
                    break
                seen.add(digest)
                docs.append({"text": text, "domain": domain, "source": name})
                taken += len(text.encode())
            if taken:
                used_sources[name] = taken
            budget -= taken
        if not docs:
            report.missing.append(domain)
            continue
        rng.shuffle(docs)
        n_val = max(1, int(len(docs) * val_fraction))
        val += docs[:n_val]
        train += docs[n_val:]
        report.domains[domain] = {"train_docs": len(docs) - n_val, "val_docs": n_val,
                                  "bytes": sum(len(d["text"].encode()) for d in docs), "sources": used_sources}
    if report.missing:
        report.notes.append(f"domains missing on this machine: {', '.join(report.missing)} (install the Debian "
                            f"packages {' '.join(DEBIAN_PACKAGES)} as root, or run scripts/setup.sh as root)")
    rng.shuffle(train)
    rng.shuffle(val)  # a token budget on the held-out split must still see every domain
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        atomic_write_bytes(out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    atomic_write_json(out_dir / "report.json", report.to_json())
    return report
