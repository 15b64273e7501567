"""The routing store: parquet shards in a run directory, written atomically.

Layout (one row per kept token in tokens/, one per token × MoE layer × rank in routing/):
  RUN_DIR/tokens/part-NNNNN.parquet   doc int64, pos int32, token_id int32, token string, domain string
  RUN_DIR/routing/part-NNNNN.parquet  doc int64, pos int32, layer int16, rank int8, expert int16, weight float32
  RUN_DIR/logits/part-NNNNN.parquet   doc, pos, layer, logits list<float32> [E]     (optional)
  RUN_DIR/run.json                    model, data, seeds, versions, token count, MoE layout
Inside a shard, routing rows are layer-major and, within a layer, in the token order of the
shard's tokens file with ranks consecutive, so a layer's routing reshapes to [T, K] without a
sort. `pos` is the position in the document (BOS, excluded by default, would be -1), so (doc, pos)
identifies a token across runs of different checkpoints on the same data. Rank 0 is the
highest weight. A shard is written to a temporary name and renamed, so a killed run never
leaves a file that looks complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepseemoe.runs.atomic import atomic_write_table

TOKENS_SCHEMA = {"doc": "int64", "pos": "int32", "token_id": "int32", "token": "string", "domain": "string"}
ROUTING_SCHEMA = {"doc": "int64", "pos": "int32", "layer": "int16", "rank": "int8", "expert": "int16",
                  "weight": "float32"}


def _schema(fields: dict[str, str]):
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in fields.items()])


class RoutingStoreWriter:
    """Buffers routing rows and flushes them to numbered parquet shards."""

    def __init__(self, run_dir: str | Path, shard_tokens: int = 1_000_000, logits: bool = False):
        self.run_dir = Path(run_dir)
        self.shard_tokens = shard_tokens
        self.logits = logits
        self._tokens: list[dict[str, np.ndarray]] = []
        self._routing: dict[int, list[dict[str, np.ndarray]]] = {}  # layer -> chunks
        self._logits: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self.shard = 0
        self.total_tokens = 0
        for sub in ("tokens", "routing", "logits"):
            stale = self.run_dir / sub
            if stale.exists():
                for f in stale.glob("part-*.parquet"):
                    f.unlink()

    def add(self, doc: np.ndarray, pos: np.ndarray, token_id: np.ndarray, token: list[str],
            domain: list[str | None], idx: dict[int, np.ndarray], weights: dict[int, np.ndarray],
            logits: dict[int, np.ndarray] | None = None) -> None:
        """One batch of T kept tokens: doc/pos/token_id [T], idx/weights {layer: [T, K]}."""
        T = len(doc)
        self._tokens.append({"doc": doc.astype(np.int64), "pos": pos.astype(np.int32),
                             "token_id": token_id.astype(np.int32), "token": np.asarray(token, dtype=object),
                             "domain": np.asarray(domain, dtype=object)})
        for layer in sorted(idx):
            w = weights[layer].astype(np.float32)
            order = np.argsort(-w, axis=1, kind="stable")  # rank 0 = highest weight
            e = np.take_along_axis(idx[layer], order, axis=1)
            w = np.take_along_axis(w, order, axis=1)
            K = e.shape[1]
            self._routing.setdefault(layer, []).append({
                "doc": np.repeat(doc.astype(np.int64), K), "pos": np.repeat(pos.astype(np.int32), K),
                "layer": np.full(T * K, layer, dtype=np.int16), "rank": np.tile(np.arange(K, dtype=np.int8), T),
                "expert": e.reshape(-1).astype(np.int16), "weight": w.reshape(-1)})
            if self.logits and logits is not None:
                self._logits.append({"doc": doc.astype(np.int64), "pos": pos.astype(np.int32),
                                     "layer": np.full(T, layer, dtype=np.int16),
                                     "logits": logits[layer].astype(np.float32)})
        self._buffered += T
        self.total_tokens += T
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self._buffered:
            return
        name = f"part-{self.shard:05d}.parquet"
        tables = {
            "tokens": pa.Table.from_pydict(_concat(self._tokens), schema=_schema(TOKENS_SCHEMA)),
            # layer-major inside a shard: each layer is one contiguous, token-ordered range of rows
            "routing": pa.Table.from_pydict(_concat([c for layer in sorted(self._routing)
                                                     for c in self._routing[layer]]),
                                            schema=_schema(ROUTING_SCHEMA)),
        }
        if self._logits:
            parts = _concat([{k: v for k, v in p.items() if k != "logits"} for p in self._logits])
            matrix = np.concatenate([p["logits"] for p in self._logits])
            parts["logits"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
            tables["logits"] = pa.table(parts)
        # routing first, tokens last: a shard's tokens file appears only once its routing is whole
        for sub in ("routing", "logits", "tokens"):
            if sub in tables:
                atomic_write_table(self.run_dir / sub / name, tables[sub])
        self._tokens, self._routing, self._logits, self._buffered = [], {}, [], 0
        self.shard += 1


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
