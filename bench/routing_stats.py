"""Benchmark: the whole `stats` suite on synthetic routing records of a given size.

    python bench/routing_stats.py                       # 1M tokens × 16 layers × top-8, E=64
    python bench/routing_stats.py --tokens 1e6 3e6 10e6 # growth with tokens

Routing is skewed (Zipf-like expert popularity per layer, deterministic seed) and written in
the exact store layout (runs/routing.py's shard format, with its manifest) before timing; only
`compute_routing_stats` is timed. Prints seconds, routing rows per second, and the ratio of
each size's time to the smallest size's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepseemoe.routing.stats import compute_routing_stats
from deepseemoe.runs.manifest import Manifest
from deepseemoe.runs.routing import ROUTING_SCHEMA, TOKENS_SCHEMA


def synthetic_run(path: Path, tokens: int, layers: int, top_k: int, experts: int, vocab: int,
                  shard_tokens: int = 1_000_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    schema_t = pa.schema([(k, getattr(pa, v)()) for k, v in TOKENS_SCHEMA.items()])
    schema_r = pa.schema([(k, getattr(pa, v)()) for k, v in ROUTING_SCHEMA.items()])
    popularity = [rng.permutation(1.0 / np.arange(1, experts + 1) ** 0.8) for _ in range(layers)]
    gumbel_scale = 1.0
    for shard, start in enumerate(range(0, tokens, shard_tokens)):
        T = min(shard_tokens, tokens - start)
        doc = (start + np.arange(T)) // 512
        pos = ((start + np.arange(T)) % 512).astype(np.int32)
        token_id = rng.zipf(1.3, T) % vocab
        domain = np.array(["code", "en", "de", "es"], dtype=object)[doc % 4]
        pq.write_table(pa.table({"doc": doc, "pos": pos, "token_id": token_id.astype(np.int32),
                                 "token": pa.array([None] * T, pa.string()), "domain": domain}, schema=schema_t),
                       path / "tokens" / f"part-{shard:05d}.parquet")
        cols = {k: [] for k in ROUTING_SCHEMA}
        for layer in range(layers):
            # top-k of log-popularity + Gumbel noise, token-dependent via the token id
            scores = np.log(popularity[layer])[None, :] + gumbel_scale * rng.gumbel(size=(T, experts)).astype(np.float32)
            scores[np.arange(T), token_id % experts] += 1.0
            idx = np.argpartition(-scores, top_k, axis=1)[:, :top_k]
            w = np.take_along_axis(scores, idx, 1)
            order = np.argsort(-w, 1)
            idx, w = np.take_along_axis(idx, order, 1), np.take_along_axis(w, order, 1)
            w = np.exp(w - w.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            cols["doc"].append(np.repeat(doc, top_k))
            cols["pos"].append(np.repeat(pos, top_k))
            cols["layer"].append(np.full(T * top_k, layer, np.int16))
            cols["rank"].append(np.tile(np.arange(top_k, dtype=np.int8), T))
            cols["expert"].append(idx.reshape(-1).astype(np.int16))
            cols["weight"].append(w.reshape(-1).astype(np.float32))
        pq.write_table(pa.table({k: np.concatenate(v) for k, v in cols.items()}, schema=schema_r),
                       path / "routing" / f"part-{shard:05d}.parquet", compression="zstd")
    (path / "run.json").write_text(json.dumps({"moe_layers": {str(i): {"num_experts": experts, "top_k": top_k}
                                                              for i in range(layers)}}))
    manifest = Manifest("routing")
    for f in sorted(path.glob("*/part-*.parquet")):
        manifest.add(path, f"{f.parent.name}/{f.name}", pq.ParquetFile(f).metadata.num_rows)
    manifest.add(path, "run.json")
    manifest.write(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e6])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the synthetic runs (default: a temp dir)")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="dsm-bench-"))
    first = None
    for n in map(int, args.tokens):
        run = base / f"run-{n}"
        (run / "tokens").mkdir(parents=True, exist_ok=True)
        (run / "routing").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        synthetic_run(run, n, args.layers, args.topk, args.experts, args.vocab)
        gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        compute_routing_stats(run, figures=False)
        secs = time.perf_counter() - t0
        rows = n * args.layers * args.topk
        first = first or (n, secs)
        print(f"tokens={n:>11,}  rows={rows:>14,}  generate={gen:6.1f}s  stats={secs:6.1f}s  "
              f"{rows / secs / 1e6:7.1f}M rows/s  time×{secs / first[1]:.2f} for tokens×{n / first[0]:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
