"""A routing run directory: the only code that knows its layout, writes it and reads it.

Layout (one row per kept token in tokens/, one per token × MoE layer × rank in routing/):
  RUN_DIR/tokens/part-NNNNN.parquet   doc int64, pos int32, token_id int32, token string (the token's
                                      text, data/token_text.py), domain string, piece string (the
                                      tokenizer's own symbol, e.g. "Ġcaf")
  RUN_DIR/routing/part-NNNNN.parquet  doc int64, pos int32, layer int16, rank int8, expert int16, weight float32
  RUN_DIR/matrix/part-NNNNN.safetensors  per MoE layer l: "experts.l" [T, K] uint8 (int16 past 255
                                      experts) and "weights.l" [T, K] float32, rows in the token order
                                      of the shard's tokens file, ranks as in routing/ (what the
                                      statistics read: no parquet decoding, the same numbers)
  RUN_DIR/logits/part-NNNNN.parquet   doc, pos, layer, logits list<float32> [E]     (optional)
  RUN_DIR/run.json                    model, data, seeds, versions, token count, MoE layout
  RUN_DIR/manifest.json               every file above: bytes, rows, sha256 (written last)
  RUN_DIR/analyses/                   derived statistics, with their own manifest naming the run's
Inside a shard, routing rows are layer-major and, within a layer, in the token order of the
shard's tokens file with ranks consecutive, so a layer's routing reshapes to [T, K] without a
sort. `pos` is the position in the document (BOS, excluded by default, would be -1), so (doc, pos)
identifies a token across runs of different checkpoints on the same data. Rank 0 is the highest
weight.

Integrity: a run is written in `.NAME.staging` beside RUN_DIR under a lock (runs/lock.py) and
swapped in whole with its manifest, so RUN_DIR holds the old complete run or the new one, never a
mix; readers refuse a run without a manifest and verify the sha256 of every file they read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepseemoe.distributed import World
from deepseemoe.errors import DeepSeeMoEError, RankLost, ReportedByRankZero, failure_line, keep
from deepseemoe.runs.atomic import atomic_path, atomic_write_json, atomic_write_table
from deepseemoe.runs.lock import recover, run_lock, sidecar, swap_in
from deepseemoe.runs.manifest import NAME as MANIFEST
from deepseemoe.runs.manifest import FileEntry, Manifest, sha256_file

KIND = "routing"
ANALYSES = "analyses"
ANALYSES_KIND = "routing-analyses"
PROGRESS = "progress"  # in the staging folder only: each rank's finished shards, for --resume
TOKENS_SCHEMA = {"doc": "int64", "pos": "int32", "token_id": "int32", "token": "string", "domain": "string",
                 "piece": "string"}
ROUTING_SCHEMA = {"doc": "int64", "pos": "int32", "layer": "int16", "rank": "int8", "expert": "int16",
                  "weight": "float32"}


def arrow_schema(fields: dict[str, str]):
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in fields.items()])


class ShardWriter:
    """Buffers routing rows and flushes them to numbered parquet shards in `folder`.

    Under torchrun each rank has its own writer on the one staging folder, its shards named
    `part-NNNNN-rRRR` (one process: `part-NNNNN`). After every shard it records its progress
    (`progress/rank-RRR.json`: the files written with their checksums, the next batch of the packed
    stream, the settings), so that `route --resume` keeps what a killed run finished."""

    def __init__(self, folder: Path, shard_tokens: int = 1_000_000, logits: bool = False, buffer_gb: float = 2.0,
                 *, rank: int = 0, world: int = 1, settings: dict | None = None, resumed: dict | None = None):
        self.folder = folder
        self.shard_tokens = shard_tokens
        self.logits = logits
        # a shard also closes early when its buffer would pass this: memory does not grow with
        # --shard-tokens (statistics do not depend on where shards end: routing/stats.py)
        self.buffer_bytes = buffer_gb * 1e9
        self.rank, self.world, self.settings = rank, world, settings
        self._bytes = 0
        self._tokens: list[dict[str, np.ndarray]] = []
        self._matrix: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # layer -> [(experts, weights)]
        self._logits: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self.shard = 0
        self.total_tokens = 0
        self.next_batch = 0  # the first batch of the packed stream not yet in a finished shard
        self._pending_batch = 0  # the same, counting the batches in the buffer
        self.entries: dict[str, FileEntry] = {}  # relative path -> size, checksum, rows: the manifest's lines
        if resumed:
            self.shard, self.total_tokens = int(resumed["shard"]), int(resumed["tokens"])
            self.next_batch = self._pending_batch = int(resumed["next_batch"])
            self.entries = {rel: FileEntry(int(e["bytes"]), str(e["sha256"]), e.get("rows"))
                            for rel, e in resumed["files"].items()}

    @property
    def progress_path(self) -> Path:
        return self.folder / PROGRESS / f"rank-{self.rank:03d}.json"

    def _name(self) -> str:
        return f"part-{self.shard:05d}.parquet" if self.world == 1 else f"part-{self.shard:05d}-r{self.rank:03d}.parquet"

    def add(self, doc: np.ndarray, pos: np.ndarray, token_id: np.ndarray, token: list[str],
            domain: list[str | None], idx: dict[int, np.ndarray], weights: dict[int, np.ndarray],
            logits: dict[int, np.ndarray] | None = None, pieces: list[str] | None = None,
            batch: int | None = None) -> None:
        """One batch of T kept tokens: doc/pos/token_id [T], their texts `token` and symbols `pieces`
        (default: the texts), idx/weights {layer: [T, K]}; `batch` is its index in the packed stream
        (what `--resume` skips once the batch is in a finished shard)."""
        T = len(doc)
        if batch is not None:
            self._pending_batch = batch + 1
        self._tokens.append({"doc": doc.astype(np.int64), "pos": pos.astype(np.int32),
                             "token_id": token_id.astype(np.int32), "token": np.asarray(token, dtype=object),
                             "domain": np.asarray(domain, dtype=object),
                             "piece": np.asarray(token if pieces is None else pieces, dtype=object)})
        for layer in sorted(idx):
            w = weights[layer].astype(np.float32)
            order = np.argsort(-w, axis=1, kind="stable")  # rank 0 = highest weight
            # kept as [T, K] (6 bytes a slot) until the shard is written: the long routing table
            # (21 bytes a slot, and copies) is built one layer at a time at `flush`
            e = np.take_along_axis(idx[layer], order, axis=1).astype(np.int16)
            w = np.take_along_axis(w, order, axis=1)
            self._matrix.setdefault(layer, []).append((e, w))
            if self.logits and logits is not None:
                self._logits.append({"doc": doc.astype(np.int64), "pos": pos.astype(np.int32),
                                     "layer": np.full(T, layer, dtype=np.int16),
                                     "logits": logits[layer].astype(np.float32)})
        self._buffered += T
        self.total_tokens += T
        # what writing the shard holds at once: the [T, K] arrays twice (joined per layer, and the
        # bytes safetensors serialises), the token rows, the logits; measured 1.6 GB per 1M tokens at
        # 16 layers × top-8 (bench/route_writer_memory.py)
        self._bytes += 2 * sum(e.nbytes + w.nbytes for e, w in (chunks[-1] for chunks in self._matrix.values())) \
            + 100 * T + (2 * sum(v.nbytes for v in logits.values()) if self.logits and logits is not None else 0)
        if self._buffered >= self.shard_tokens or self._bytes >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self._buffered:
            return
        name = self._name()
        tables = {"tokens": pa.Table.from_pydict(_concat(self._tokens), schema=arrow_schema(TOKENS_SCHEMA))}
        self._write_routing(self.folder / "routing" / name)
        if self._logits:
            parts = _concat([{k: v for k, v in p.items() if k != "logits"} for p in self._logits])
            values = np.concatenate([p["logits"] for p in self._logits])
            parts["logits"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
            tables["logits"] = pa.table(parts)
        for sub, table in tables.items():
            atomic_write_table(self.folder / sub / name, table)
            self._entry(f"{sub}/{name}", table.num_rows)
        arrays = {}
        for layer in sorted(self._matrix):  # each layer's batches joined, then let go: one copy at a time
            chunks = self._matrix.pop(layer)
            e = np.concatenate([c[0] for c in chunks])
            arrays[f"experts.{layer}"] = e.astype(np.uint8) if e.size == 0 or e.max() < 256 else e
            arrays[f"weights.{layer}"] = np.concatenate([c[1] for c in chunks])
            del chunks, e
        mname = name.replace(".parquet", ".safetensors")
        with atomic_path(self.folder / "matrix" / mname) as tmp:
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp))
        self._entry(f"matrix/{mname}", tables["tokens"].num_rows)
        self._tokens, self._logits, self._buffered, self._bytes = [], [], 0, 0
        self.shard += 1
        self.next_batch = self._pending_batch
        if self.settings is not None:
            atomic_write_json(self.progress_path, {
                "settings": self.settings, "rank": self.rank, "world": self.world, "shard": self.shard,
                "tokens": self.total_tokens, "next_batch": self.next_batch,
                "files": {rel: {k: v for k, v in vars(e).items() if v is not None} for rel, e in self.entries.items()}})

    def _entry(self, rel: str, rows: int) -> None:
        """The manifest line of a file just written, hashed while it is still in the page cache
        (each rank hashes its own files; the commit does not read them again)."""
        path = self.folder / rel
        self.entries[rel] = FileEntry(path.stat().st_size, sha256_file(path), rows)

    def _write_routing(self, path: Path) -> None:
        """The shard's long routing table, layer-major (each layer one contiguous, token-ordered range
        of rows), written batch by batch: the expanded rows of one batch of one layer are in memory
        at once, beside the compact [T, K] arrays."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = arrow_schema(ROUTING_SCHEMA)
        rows = 0
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for layer, chunks in sorted(self._matrix.items()):
                for tokens, (e, w) in zip(self._tokens, chunks, strict=True):  # batch i of the tokens, of the layer
                    T, K = e.shape
                    writer.write_table(pa.Table.from_pydict({
                        "doc": np.repeat(tokens["doc"], K), "pos": np.repeat(tokens["pos"], K),
                        "layer": np.full(T * K, layer, np.int16), "rank": np.tile(np.arange(K, dtype=np.int8), T),
                        "expert": e.reshape(-1), "weight": w.reshape(-1)}, schema=schema))
                    rows += T * K
        self._entry(f"routing/{path.name}", rows)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _is_replaceable(path: Path) -> bool:
    """A folder that `--overwrite` may replace: empty, or a routing run (complete or not)."""
    if not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    return not entries or MANIFEST in entries or {"run.json", "routing"} & entries == {"run.json", "routing"} \
        or entries <= {"tokens", "routing", "matrix", "logits", "run.json", "analyses"}


class RoutingRunWriter:
    """Write a routing run: `with RoutingRunWriter(out) as w: w.add(...); w.commit(meta)`.

    Rank 0 holds the run's lock from enter to exit; rows go to `.NAME.staging`; `commit` writes
    run.json and the manifest there and swaps the folder in. Leaving the block without `commit` (an
    error, Ctrl-C) removes the staging folder and leaves any old run untouched. A process killed
    outright leaves its finished shards there; with `resume` (and the same `settings`) the next
    writer keeps them, and `next_batch` says where each rank's packed stream picks up.

    Under torchrun (`world` of N ranks) every rank writes its own shards into the one staging folder
    (on several machines: a shared file system) and rank 0 commits them all once every rank has
    finished; a failure on any rank is reported once, by rank 0, naming the rank."""

    def __init__(self, run_dir: str | Path, *, overwrite: bool = False, shard_tokens: int = 1_000_000,
                 logits: bool = False, buffer_gb: float = 2.0, world: World | None = None, resume: bool = False,
                 settings: dict | None = None):
        self.run_dir = Path(run_dir)
        self.overwrite, self.shard_tokens, self.logits, self.buffer_gb = overwrite, shard_tokens, logits, buffer_gb
        self.world = world or World()
        self.resume = resume
        # what the run's content depends on, as JSON reads it back: compared across ranks, and with
        # the progress an interrupted run recorded before `resume` keeps its shards
        self.settings = None if settings is None else json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.staging = sidecar(self.run_dir, "staging")
        self.shards: ShardWriter | None = None
        self._lock = None
        self.committed = False
        self.resumed_tokens = 0  # kept from an interrupted run, all ranks
        self.run_tokens = 0  # the committed run's tokens, all ranks

    def __enter__(self) -> RoutingRunWriter:
        if self.world.size > 1:
            self._same_settings_on_every_rank()
        state, error, failure = None, None, None
        if self.world.main:
            try:
                state = self._open()
            except BaseException as exc:  # told to the other ranks before it propagates
                error, failure = exc, str(exc) or type(exc).__name__
        if self.world.size > 1:
            failure, state = self.world.gather([failure, state])[0]
        if error is not None:
            raise error
        if failure:
            raise ReportedByRankZero(failure)
        state = {int(rank): rec for rank, rec in (state or {}).items()}  # JSON keys are strings
        self.resumed_tokens = sum(int(rec["tokens"]) for rec in state.values())
        self.shards = ShardWriter(self.staging, self.shard_tokens, self.logits, self.buffer_gb, rank=self.world.rank,
                                  world=self.world.size, settings=self.settings, resumed=state.get(self.world.rank))
        return self

    def _same_settings_on_every_rank(self) -> None:
        every = self.world.gather(self.settings)
        for rank, theirs in enumerate(every):
            if theirs != every[0]:
                diff = settings_diff(every[0], theirs, "on rank 0", f"on rank {rank}")
                message = (f"rank {rank} was started with other settings than rank 0 ({diff}); start every rank "
                           "with the same command")
                if self.world.main:
                    raise DeepSeeMoEError(message)
                raise ReportedByRankZero(message)

    def _open(self) -> dict[int, dict] | None:
        """Rank 0: take the lock, check the folder, and prepare the staging folder (new, or the one
        an interrupted run left when resuming); the kept progress of each rank, or None."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise DeepSeeMoEError(f"--out {self.run_dir} is a file; give a folder for the run")
        self._lock = run_lock(self.run_dir)
        self._lock.__enter__()
        try:
            recover(self.run_dir, keep_staging=self.resume)
            if self.run_dir.exists() and any(self.run_dir.iterdir()):
                if not _is_replaceable(self.run_dir):
                    raise DeepSeeMoEError(f"{self.run_dir} exists and is not a routing run; choose another --out")
                if not self.overwrite:
                    raise DeepSeeMoEError(f"{self.run_dir} already holds a routing run; pass --overwrite to replace "
                                          "it (the old run stays until the new one is complete) or choose another --out")
            state = self._kept_progress() if self.resume else None
            if state is None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging.mkdir(parents=True)
            old = "the routing run already in it is unchanged" if self.run_dir.exists() else "it holds nothing"
            keep("route", f"nothing of the new run in {self.run_dir} is kept; {old}")
        except BaseException:
            self._lock.__exit__(None, None, None)
            self._lock = None
            raise
        return state

    def _kept_progress(self) -> dict[int, dict] | None:
        """What an interrupted run finished, checked: every rank's record written with the same
        settings, every file it lists whole; the files it does not list (a shard being written
        when the process died) are removed. None when there is nothing to keep."""
        records = sorted((self.staging / PROGRESS).glob("rank-*.json")) if self.staging.is_dir() else []
        if not records:
            return None
        state: dict[int, dict] = {}
        for path in records:
            try:
                rec = json.loads(path.read_text())
                theirs, rank, files = rec["settings"], int(rec["rank"]), rec["files"]
            except (ValueError, KeyError, TypeError):
                raise DeepSeeMoEError(f"{path}, the progress of the interrupted run, is damaged; rerun without "
                                      "--resume to start over") from None
            if theirs != self.settings:
                diff = settings_diff(theirs, self.settings, "then", "now")
                raise DeepSeeMoEError(f"the interrupted run in {self.staging} was started with other settings "
                                      f"({diff}); resume it with its own settings, or rerun without --resume to "
                                      "start over")
            for rel, entry in files.items():
                file = self.staging / rel
                if not file.is_file() or file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                    raise DeepSeeMoEError(f"{file}, kept from the interrupted run, is missing or damaged; rerun "
                                          "without --resume to start over")
            state[rank] = rec
        listed = {rel for rec in state.values() for rel in rec["files"]}
        for sub in ("tokens", "routing", "matrix", "logits"):
            for file in sorted((self.staging / sub).glob("*")) if (self.staging / sub).is_dir() else []:
                if f"{sub}/{file.name}" not in listed:
                    file.unlink()
        return state

    def add(self, *args, **kwargs) -> None:
        self.shards.add(*args, **kwargs)

    @property
    def total_tokens(self) -> int:
        """Tokens of this rank's shards (kept ones included)."""
        return self.shards.total_tokens

    @property
    def next_batch(self) -> int:
        """The first batch of the packed stream this rank has not written yet (0 unless resuming)."""
        return self.shards.next_batch

    def commit(self, meta: dict, *, failure: str | None = None, batches: int | None = None) -> str | None:
        """Finish the run with `meta` as run.json (must hold the MoE layout); returns the manifest's
        sha256 on rank 0. Every rank calls it, with the `failure` it met (under torchrun a rank's
        error is carried here rather than raised, so no rank waits on one that left) and the number
        of `batches` the packed stream held."""
        if "moe_layers" not in meta:
            raise ValueError("run.json needs the MoE layout (moe_layers)")
        if failure is None:
            try:
                self.shards.flush()
            except BaseException as exc:
                if self.world.size == 1:
                    raise
                failure = failure_line(exc)[0]
        self.world.agree(failure)
        entries = {rel: {k: v for k, v in vars(e).items() if v is not None} for rel, e in self.shards.entries.items()}
        reports = self.world.gather([entries, self.shards.total_tokens, self.shards.shard, batches])
        self.run_tokens = sum(r[1] for r in reports)
        digest, error = None, None
        if self.world.main:
            try:
                digest = self._write(meta, reports)
            except BaseException as exc:
                error = exc
        if self.world.size > 1:
            self.world.agree(None if error is None else (str(error) or type(error).__name__))
        if error is not None:
            raise error
        return digest

    def _write(self, meta: dict, reports: list[tuple]) -> str:
        seen = max((r[3] for r in reports if r[3] is not None), default=None)
        idle = [rank for rank, r in enumerate(reports) if r[1] == 0]
        if self.world.size > 1 and seen is not None and seen < self.world.size:
            raise DeepSeeMoEError(f"{self.world.size} ranks were started but the data fills only {seen} batch(es) of "
                                  f"contexts; start at most {max(seen, 1)} (torchrun --nproc-per-node) or lower "
                                  "--batch-size")
        if self.world.size > 1 and idle:
            raise DeepSeeMoEError(f"rank {idle[0]} of {self.world.size} routed no tokens ({len(idle)} rank(s) without "
                                  "any): the data has too few documents for this many ranks; start fewer "
                                  "(torchrun --nproc-per-node)")
        tokens = sum(r[1] for r in reports)
        extra = {"world_size": self.world.size} if self.world.size > 1 else {}
        atomic_write_json(self.staging / "run.json", {**meta, **extra, "tokens": tokens,
                                                      "shards": sum(r[2] for r in reports)})
        shutil.rmtree(self.staging / PROGRESS, ignore_errors=True)  # the run is complete: nothing to resume
        manifest = Manifest(KIND)
        for entries, *_ in reports:
            manifest.files.update({rel: FileEntry(int(e["bytes"]), str(e["sha256"]), e.get("rows"))
                                   for rel, e in entries.items()})
        manifest.add(self.staging, "run.json")
        digest = manifest.write(self.staging)
        swap_in(self.staging, self.run_dir)
        self.committed = True
        keep("route", None)
        return digest

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, RankLost):  # a peer died mid-run: its finished shards and ours stay for --resume
            exc.args = (f"{exc}; the shards finished so far stay in {self.staging}: rerun the same command with "
                        "--resume",)
        if self._lock is None:  # another rank, or refused before the lock
            return
        try:
            if not self.committed and self.staging.exists() and not isinstance(exc, RankLost):
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._lock.__exit__(None, None, None)


def settings_diff(a: dict | None, b: dict | None, a_is: str, b_is: str, most: int = 3) -> str:
    """The settings that differ between two records, for an error line: `key: A a_is, B b_is; …`
    (the first `most` keys in name order)."""
    a, b = a or {}, b or {}
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: {a.get(k)} {a_is}, {b.get(k)} {b_is}" for k in keys[:most])


@dataclass
class RoutingRun:
    """A complete routing run, opened for reading. Every read is checked against the manifest."""

    run_dir: Path
    manifest: Manifest
    digest: str  # sha256 of manifest.json: the run's identity for what is derived from it
    meta: dict
    parts: list[str]  # shard file names, in order
    layers: list[int]
    num_experts: dict[int, int]
    top_k: dict[int, int]
    _verified: set[str] = field(default_factory=set, repr=False)  # files hashed once already

    @classmethod
    def open(cls, run_dir: str | Path) -> RoutingRun:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            old = sidecar(run_dir, "old")
            hint = f" (a previous run is kept at {old}: a writer died while replacing it)" if old.exists() else ""
            raise DeepSeeMoEError(f"{run_dir} is not a routing run{hint}; create one with "
                                  "`deepseemoe route MODEL --data SOURCE --out RUN_DIR`")
        if not (run_dir / MANIFEST).exists() and not (run_dir / "routing").is_dir():
            raise DeepSeeMoEError(f"{run_dir} is not a routing run (no routing/); create one with "
                                  "`deepseemoe route MODEL --data SOURCE --out RUN_DIR`")
        manifest, digest = Manifest.read(run_dir, KIND)
        manifest.check_sizes(run_dir)
        try:
            meta = json.loads(manifest.verified_bytes(run_dir, "run.json"))
            moe = meta["moe_layers"]
            layers = sorted(int(k) for k in moe)
            num_experts = {int(k): int(v["num_experts"]) for k, v in moe.items()}
            top_k = {int(k): int(v["top_k"]) for k, v in moe.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DeepSeeMoEError(f"{run_dir / 'run.json'} lacks the MoE layout; write the run again") from None
        parts = sorted(rel.split("/", 1)[1] for rel in manifest.files if rel.startswith("tokens/"))
        missing = [p for p in parts if f"routing/{p}" not in manifest.files
                   or f"matrix/{p.replace('.parquet', '.safetensors')}" not in manifest.files]
        if not parts or missing:
            raise DeepSeeMoEError(f"{run_dir} lists no complete shard; write the run again")
        return cls(run_dir, manifest, digest, meta, parts, layers, num_experts, top_k)

    def verify_all(self) -> tuple[int, int]:
        """Check every listed file's sha256 (each once per process while unchanged); (files, bytes).
        What is derived from a run (statistics, a report) checks the whole run first: it reads the
        compact matrix files, and a damaged parquet shard beside them is still a damaged run."""
        for rel in self.manifest.files:
            self.verified_path(rel)
        return len(self.manifest.files), sum(e.bytes for e in self.manifest.files.values())

    def verified_path(self, rel: str) -> Path:
        """The path of one listed file, its sha256 checked the first time this opened run is asked
        for it: a long-lived reader (the explorer) hashes each file once, then reads slices of it."""
        if rel not in self._verified:
            self.manifest.verify_file(self.run_dir, rel)
            self._verified.add(rel)
        return self.run_dir / rel

    def read_columns(self, sub: str, part: str, columns: list[str]):
        """Some columns of one shard file (verified once per opened run), read from disk without
        loading the rest of the file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.verified_path(f"{sub}/{part}")
        try:
            return pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as exc:  # a checksummed file can still be a foreign one
            raise _not_parquet(path, exc) from None

    def routing_rows(self, part: str, start: int, stop: int,
                     layers: list[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Rows [start, stop) of a shard's routing per MoE layer: (experts [n, K] int16, weights
        [n, K] float32), sliced from the memory-mapped matrix file (verified once per opened run),
        so a document's routing costs its own rows, not the shard's."""
        from safetensors import safe_open

        rel = f"matrix/{part.replace('.parquet', '.safetensors')}"
        path = self.verified_path(rel)
        out = {}
        try:
            with safe_open(path, framework="numpy") as f:
                for layer in self.layers if layers is None else layers:
                    e = f.get_slice(f"experts.{layer}")[start:stop]
                    w = f.get_slice(f"weights.{layer}")[start:stop]
                    out[layer] = (np.asarray(e).astype(np.int16), np.asarray(w))
        except DeepSeeMoEError:
            raise
        except Exception as exc:  # a checksummed file can still be a foreign one
            raise DeepSeeMoEError(f"{path} cannot be read ({exc}); write the run again") from None
        return out

    def read_table(self, sub: str, part: str, columns: list[str] | None = None):
        """One shard file as a pyarrow table, after checking its sha256."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.manifest.verified_bytes(self.run_dir, f"{sub}/{part}")
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
        except (pa.ArrowException, OSError) as exc:  # a checksummed file can still be a foreign one
            raise _not_parquet(self.run_dir / sub / part, exc) from None

    def tokens(self, columns: list[str] | None = None):
        """The whole token table (verified), shards concatenated in order."""
        import pyarrow as pa

        return pa.concat_tables([self.read_table("tokens", p, columns) for p in self.parts])

    def routing_layers(self, part: str, T: int, columns=("expert", "weight")) -> dict[int, tuple[np.ndarray, ...]]:
        """Per MoE layer, the shard's routing as [T, K] arrays (`columns`: expert, weight), read from
        its compact matrix file (verified; the long parquet holds the same numbers for other engines)."""
        from safetensors.numpy import load

        matrix = f"matrix/{part.replace('.parquet', '.safetensors')}"
        try:
            arrays = load(self.manifest.verified_bytes(self.run_dir, matrix))
        except DeepSeeMoEError:
            raise
        except Exception as exc:  # a checksummed file can still be a foreign one
            raise DeepSeeMoEError(f"{self.run_dir / matrix} cannot be read ({exc}); write the run again") from None
        names = {"expert": "experts", "weight": "weights"}
        out = {}
        for layer in self.layers:
            got = tuple(arrays[f"{names[c]}.{layer}"] for c in columns)
            if any(a.shape != (T, self.top_k[layer]) for a in got):
                raise DeepSeeMoEError(f"{self.run_dir / matrix} does not match its tokens ({T} tokens, "
                                      f"top-{self.top_k[layer]} at layer {layer}); write the run again")
            out[layer] = tuple(a.astype(np.int16) if c == "expert" else a for a, c in zip(got, columns, strict=True))
        return out

    # ---- analyses/: derived from this run, recorded with the run's digest ---------------------

    def save_analyses(self, tables: dict, summary: dict, draw: Callable[[Path], object] | None = None) -> Path:
        """Write RUN_DIR/analyses/ whole: `tables` (name -> DataFrame) as parquet, `summary.json` with
        this run's digest as its input, the figures `draw(folder)` writes, and a manifest; swapped in
        under the run's lock, so readers see the old analyses or the new ones."""
        import pyarrow as pa

        target = self.run_dir / ANALYSES
        with run_lock(self.run_dir):
            if Manifest.read(self.run_dir, KIND)[1] != self.digest:
                raise DeepSeeMoEError(f"{self.run_dir} was rewritten while its statistics were computed; run "
                                      "`deepseemoe stats` again")
            recover(target)
            staging = sidecar(target, "staging")
            try:
                staging.mkdir(parents=True)
                manifest = Manifest(ANALYSES_KIND)
                for name, df in tables.items():
                    atomic_write_table(staging / f"{name}.parquet", pa.Table.from_pandas(df, preserve_index=False))
                atomic_write_json(staging / "summary.json",
                                  {**summary, "inputs": {"routing_run": self.digest}})
                if draw is not None:
                    draw(staging)
                for path in sorted(staging.iterdir()):
                    rows = tables[path.stem].shape[0] if path.suffix == ".parquet" else None
                    manifest.add(staging, path.name, rows)
                manifest.write(staging)
                swap_in(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target

    @property
    def analyses_dir(self) -> Path:
        return self.run_dir / ANALYSES

    @property
    def has_analyses(self) -> bool:
        """`stats` has written RUN_DIR/analyses/ (not yet verified: `analyses()` does that)."""
        return self.analyses_dir.is_dir()

    def analyses(self) -> Analyses:
        """RUN_DIR/analyses/, refused in one line when missing, damaged or computed from other data."""
        folder = self.run_dir / ANALYSES
        if not folder.is_dir():
            raise DeepSeeMoEError(f"{self.run_dir} has no routing statistics yet; run `deepseemoe stats "
                                  f"{self.run_dir}` first")
        manifest, _ = Manifest.read(folder, ANALYSES_KIND)
        manifest.check_sizes(folder)
        summary = json.loads(manifest.verified_bytes(folder, "summary.json"))
        if summary.get("inputs", {}).get("routing_run") != self.digest:
            raise DeepSeeMoEError(f"{folder} was computed from other routing data than {self.run_dir} now holds "
                                  f"(stale); run `deepseemoe stats {self.run_dir}` again")
        return Analyses(folder, manifest, summary)


def _not_parquet(path: Path, exc: Exception) -> DeepSeeMoEError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DeepSeeMoEError(f"{path} cannot be read as this version's parquet ({first}); write the run again")


@dataclass
class Analyses:
    """A run's verified statistics: summary, tables and figures."""

    folder: Path
    manifest: Manifest
    summary: dict

    def table(self, name: str):
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.manifest.verified_bytes(self.folder, f"{name}.parquet")
        return pq.read_table(pa.BufferReader(data)).to_pandas() if data else pd.DataFrame()

    def figure(self, name: str) -> bytes | None:
        """A PNG's bytes (verified), or None when the statistics were computed without it."""
        rel = f"{name}.png"
        return self.manifest.verified_bytes(self.folder, rel) if rel in self.manifest.files else None
