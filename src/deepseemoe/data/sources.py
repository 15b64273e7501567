"""Text sources: Hugging Face datasets (streamed) and local files, as a stream of documents.

A source spec is either
  * local files: a path, a folder, or a glob of `.jsonl`, `.jsonl.zst`/`.jsonl.zstd`, `.parquet`,
    `.txt` (one document per `.txt` file);
  * a Hugging Face dataset: `hf:NAME` (config, split and data files as options), always
    streamed, so DCLM's `*.jsonl.zstd` shards are read without downloading a whole shard first.
The domain label of a document comes from a field (`domain_field`) or, with
`domain_from_file=True`, from the file's name (without extensions).
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.zstd", ".parquet", ".txt", ".json")


@dataclass(frozen=True)
class Document:
    doc_id: int  # position in the source's (optionally shuffled) order
    text: str
    domain: str | None
    source: str  # file name or dataset name


@dataclass(frozen=True)
class TextSource:
    spec: str
    field: str = "text"
    domain_field: str | None = None
    domain_from_file: bool = False
    hf_config: str | None = None
    split: str = "train"
    data_files: str | None = None  # for hf:json / hf:parquet style loaders
    min_chars: int = 0
    max_chars: int | None = None
    max_docs: int | None = None
    shuffle: bool = False  # local sources only: shuffle file order and documents with `seed`
    seed: int = 0
    # documents taken in turn from each domain (within windows of INTERLEAVE_WINDOW documents), so
    # that the first few thousand tokens already span every domain; doc_id counts in that order
    interleave_domains: bool = False

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(LOCAL_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix)


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(_suffix(path))] if _suffix(path) else path.stem


def resolve_files(spec: str) -> list[Path]:
    """Files named by a path, a folder (all supported files inside, recursively) or a glob."""
    path = Path(spec).expanduser()
    # An existing path is taken literally, whatever its characters ("notes [v2]/a.jsonl"); only a
    # path that does not exist is read as a glob pattern.
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.exists():
        files = [path]
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    else:
        raise DeepSeeMoEError(f"data source {spec} does not exist; give a file, a folder, a glob, or hf:DATASET")
    files = [f for f in files if _suffix(f) in LOCAL_SUFFIXES]
    if not files:
        raise DeepSeeMoEError(f"data source {spec} holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def _read_jsonl(stream: io.TextIOBase, where: str) -> Iterator[dict]:
    for line_no, line in enumerate(stream, 1):
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            raise DeepSeeMoEError(f"{where}:{line_no} is not valid JSON; each line of a .jsonl file must be one "
                                  "JSON object") from None


def _records(path: Path) -> Iterator[dict]:
    suffix = _suffix(path)
    try:
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                yield from _read_jsonl(f, str(path))
        elif suffix in (".jsonl.zst", ".jsonl.zstd"):
            import zstandard

            with open(path, "rb") as raw:
                reader = zstandard.ZstdDecompressor().stream_reader(raw)
                yield from _read_jsonl(io.TextIOWrapper(reader, encoding="utf-8"), str(path))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        elif suffix == ".txt":
            yield {"text": path.read_text(encoding="utf-8")}
    except (OSError, UnicodeDecodeError) as exc:
        raise DeepSeeMoEError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # zstd/parquet decoding errors
        if isinstance(exc, DeepSeeMoEError):
            raise
        raise DeepSeeMoEError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def _hf_records(source: TextSource, part: tuple[int, int] | None = None) -> Iterator[dict]:
    import datasets

    name = source.spec.removeprefix("hf:")
    try:
        ds = datasets.load_dataset(name, source.hf_config, split=source.split, streaming=True,
                                   data_files=source.data_files)
    except Exception as exc:
        raise DeepSeeMoEError(f"cannot open dataset {name!r} (split {source.split!r}): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                              "check the name, or use local files when the hub is unreachable") from None
    if part is not None:
        from datasets.distributed import split_dataset_by_node

        # datasets' own split: whole files per rank when their number divides by the ranks (each
        # rank downloads only its own), else every rank-th record
        ds = split_dataset_by_node(ds, rank=part[0], world_size=part[1])
    yield from ds


INTERLEAVE_WINDOW = 20_000


def iter_documents(source: TextSource, part: tuple[int, int] | None = None) -> Iterator[Document]:
    """The source's documents after the length filters, up to `max_docs` (interleaved by domain
    when the source asks for it).

    `part=(rank, ranks)`: this rank's share of the documents, disjoint from the other ranks' and
    together all of them. Local files: every ranks-th document, ids as without `part` (each rank
    reads the files; only its own documents go on). Streams (`hf:`): datasets' own split of the
    stream, so a rank reads only its share; ids are the rank's own count × ranks + rank (unique,
    and the same on a rerun with as many ranks), `max_docs` a share of ⌈max_docs / ranks⌉."""
    if part is None:
        yield from _iter_documents(source, None)
        return
    rank, ranks = part
    if source.spec.startswith("hf:"):
        if source.max_docs is not None:
            source = replace(source, max_docs=-(-source.max_docs // ranks))
        for d in _iter_documents(source, part):
            yield replace(d, doc_id=d.doc_id * ranks + rank)
        return
    for d in _iter_documents(source, None):
        if d.doc_id % ranks == rank:
            yield d


def _iter_documents(source: TextSource, part: tuple[int, int] | None) -> Iterator[Document]:
    docs = _filtered_documents(source, part)
    if not source.interleave_domains:
        yield from docs
        return
    kept = 0
    while True:
        window = list(itertools.islice(docs, INTERLEAVE_WINDOW))
        if not window:
            return
        buckets: dict[str | None, list[Document]] = {}
        for d in window:
            buckets.setdefault(d.domain, []).append(d)
        for group in itertools.zip_longest(*buckets.values()):
            for d in group:
                if d is not None:
                    yield replace(d, doc_id=kept)
                    kept += 1


def _filtered_documents(source: TextSource, part: tuple[int, int] | None = None) -> Iterator[Document]:
    if source.spec.startswith("hf:"):
        streams = [(source.spec.removeprefix("hf:"), _hf_records(source, part))]
    else:
        files = resolve_files(source.spec)
        if source.shuffle:
            random.Random(source.seed).shuffle(files)
        streams = [(f, _records(f)) for f in files]
    kept = 0
    seen_any = False
    for origin, records in streams:
        name = origin.name if isinstance(origin, Path) else origin
        file_domain = _stem(origin) if isinstance(origin, Path) and source.domain_from_file else None
        for record in records:
            seen_any = True
            if source.field not in record:
                raise DeepSeeMoEError(f"{name}: records have no field {source.field!r} (fields: "
                                      f"{', '.join(map(str, record))}); pass the text field with --field")
            text = record[source.field]
            if not isinstance(text, str) or len(text) < source.min_chars:
                continue
            if source.max_chars is not None and len(text) > source.max_chars:
                continue
            domain = file_domain
            if source.domain_field is not None:
                if source.domain_field not in record:
                    raise DeepSeeMoEError(f"{name}: records have no domain field {source.domain_field!r}; pass an "
                                          "existing field with --domain-field or use --domain-from-file")
                domain = None if record[source.domain_field] is None else str(record[source.domain_field])
            yield Document(kept, text, domain, name)
            kept += 1
            if source.max_docs is not None and kept >= source.max_docs:
                return
    if not seen_any:
        raise DeepSeeMoEError(f"data source {source.spec} is empty")
