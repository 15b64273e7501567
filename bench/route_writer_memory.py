"""Benchmark: the route writer's peak memory for one shard, against the shard's size.

    python bench/route_writer_memory.py                          # 250k and 1M-token shards
    python bench/route_writer_memory.py --tokens 1e5 1e6 --layers 16 --top-k 8

Feeds `RoutingRunWriter` (what `route` writes through) batches of 8 × 2,048 tokens of synthetic
routing at a real MoE's shape (default: OLMoE-1B-7B, 16 MoE layers × top-8 of 64) with
`--shard-tokens` equal to the whole run, so one shard holds every token, and commits it. Each size
runs in a fresh process; prints the shards written, the peak resident memory above the process's
memory before the first batch, per million tokens, and the ratio between sizes. With `--buffer-gb`
the writer closes shards early and the peak stays near it whatever the tokens (run it with the old
writer on PYTHONPATH for the before: 7.7 GB per 1M tokens at the default shape, 2026-12-07). No
model: the model's own memory is not part of the figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 8 * 2048


def _one(tokens: int, layers: int, top_k: int, experts: int, buffer_gb: float, out: Path, queue) -> None:
    from deepseemoe.runs.routing import RoutingRunWriter

    rng = np.random.default_rng(0)
    idx = {la: np.argsort(rng.random((BATCH, experts)), axis=1)[:, :top_k] for la in range(layers)}
    w = {la: rng.random((BATCH, top_k)).astype(np.float32) for la in range(layers)}
    ids = rng.integers(0, 50_000, BATCH)
    texts = [f"t{i}" for i in ids]
    domains = ["en"] * BATCH
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with RoutingRunWriter(out, shard_tokens=tokens + 1, buffer_gb=buffer_gb) as writer:
        for b in range(0, tokens, BATCH):
            n = min(BATCH, tokens - b)
            doc = np.arange(b, b + n) // 512
            writer.add(doc, np.arange(b, b + n) % 512, ids[:n], texts[:n], domains[:n],
                       {la: v[:n] for la, v in idx.items()}, {la: v[:n] for la, v in w.items()})
        writer.commit({"moe_layers": {str(la): {"num_experts": experts, "top_k": top_k} for la in range(layers)}})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(((peak - base) / 1e6, time.perf_counter() - start, len(list((out / "tokens").glob("*.parquet")))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=float, nargs="+", default=[2.5e5, 1e6])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--buffer-gb", type=float, default=1e6, help="the writer's buffer (route --buffer-gb); "
                   "default: unbounded, so the shard holds every token")
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for t in a.tokens:
        with tempfile.TemporaryDirectory() as tmp:
            q = ctx.Queue()
            proc = ctx.Process(target=_one, args=(int(t), a.layers, a.top_k, a.experts, a.buffer_gb, Path(tmp) / "run", q))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"the {int(t):,}-token run failed (exit {proc.exitcode}; out of memory?)")
            gb, seconds, shards = q.get()
            rows.append((int(t), gb, seconds, shards))
    print(f"route writer, --shard-tokens above the run's tokens, --buffer-gb {a.buffer_gb:g}, {a.layers} MoE layers × "
          f"top-{a.top_k} of {a.experts}")
    print(f"{'tokens':>10s} {'shards':>7s} {'peak GB':>8s} {'GB per 1M tokens':>17s} {'seconds':>8s}")
    for t, gb, s, shards in rows:
        print(f"{t:>10,d} {shards:7d} {gb:8.2f} {gb / t * 1e6:17.2f} {s:8.1f}")
    if len(rows) > 1:
        print(f"peak memory ratio {rows[-1][1] / rows[0][1]:.2f} for {rows[-1][0] / rows[0][0]:.1f}× the tokens")


if __name__ == "__main__":
    main()
