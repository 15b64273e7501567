"""Benchmark: the whole `stats` suite on synthetic routing records of a given size.

    python bench/routing_stats.py                       # 1M tokens × 16 layers × top-8, E=64
    python bench/routing_stats.py --tokens 1e6 1e7      # growth with tokens
    python bench/routing_stats.py --tokens 1e6 1e7 1e8 --layers 2 --topk 2   # to 100M on a small disk

Routing is skewed (Zipf-like expert popularity per layer, Gumbel noise, a token-dependent
preference; deterministic seed) and written through the project's own run writer
(`RoutingRunWriter`: tokens, long routing parquet, compact matrix, manifest) before timing. The
routing of one 1M-token block is drawn once and reused for every further block (documents and
token ids differ), so generating 10M tokens takes minutes, not an hour. Only
`compute_routing_stats` is timed, in a fresh process. Prints seconds, routing
rows per second, the ratio of each size's time to the smallest size's, and the peak memory of the
process that computed them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from deepseemoe.routing.stats import compute_routing_stats, save_routing_stats
from deepseemoe.runs.routing import RoutingRunWriter

BLOCK = 1_000_000


def _block_routing(rng, T: int, layers: int, top_k: int, experts: int, token_id: np.ndarray):
    popularity = [rng.permutation(1.0 / np.arange(1, experts + 1) ** 0.8) for _ in range(layers)]
    idx_all, w_all = {}, {}
    for layer in range(layers):
        # top-k of log-popularity + Gumbel noise, token-dependent via the token id
        scores = np.log(popularity[layer])[None, :] + rng.gumbel(size=(T, experts)).astype(np.float32)
        scores[np.arange(T), token_id % experts] += 1.0
        idx = np.argpartition(-scores, top_k, axis=1)[:, :top_k]
        w = np.take_along_axis(scores, idx, 1)
        w = np.exp(w - w.max(1, keepdims=True))
        idx_all[layer], w_all[layer] = idx, (w / w.sum(1, keepdims=True)).astype(np.float32)
    return idx_all, w_all


def synthetic_run(path: Path, tokens: int, layers: int, top_k: int, experts: int, vocab: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    meta = {"moe_layers": {str(i): {"num_experts": experts, "top_k": top_k} for i in range(layers)},
            "model": "synthetic"}
    block = None
    with RoutingRunWriter(path, overwrite=True, shard_tokens=BLOCK) as writer:
        for start in range(0, tokens, BLOCK):
            T = min(BLOCK, tokens - start)
            doc = (start + np.arange(T)) // 512
            pos = ((start + np.arange(T)) % 512).astype(np.int32)
            token_id = rng.zipf(1.3, T) % vocab
            if block is None:
                block = _block_routing(rng, T, layers, top_k, experts, token_id)
            idx = {la: v[:T] for la, v in block[0].items()}
            w = {la: v[:T] for la, v in block[1].items()}
            domain = np.array(["code", "en", "de", "es"], dtype=object)[doc % 4].tolist()
            writer.add(doc, pos, token_id, [None] * T, domain, idx, w)
        writer.commit(meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e6])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the synthetic runs (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="time the runs already in --dir instead of writing them")
    args = ap.parse_args()
    # a temp folder of our own making goes when we are done (a 1e7-token run is gigabytes)
    base = args.dir or Path(tempfile.mkdtemp(prefix="dsm-bench-"))
    try:
        _time_runs(args, base)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


def _time_runs(args, base: Path) -> None:
    first = None
    for n in map(int, args.tokens):
        run = base / f"run-{n}"
        t0 = time.perf_counter()
        if args.reuse and (run / "manifest.json").exists():
            gen = 0.0
        else:
            synthetic_run(run, n, args.layers, args.topk, args.experts, args.vocab)
            gen = time.perf_counter() - t0
        # the statistics run in a fresh process, so their time and peak memory are theirs alone
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_timed_stats, args=(str(run), queue))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the statistics process failed (exit {child.exitcode}) on {run}")
        secs, peak = queue.get()
        rows = n * args.layers * args.topk
        first = first or (n, secs)
        print(f"tokens={n:>11,}  rows={rows:>14,}  generate={gen:6.1f}s  stats={secs:6.1f}s  "
              f"{rows / secs / 1e6:7.1f}M rows/s  time×{secs / first[1]:.2f} for tokens×{n / first[0]:.1f}  "
              f"stats peak RSS {peak:.1f} GB", flush=True)


def _timed_stats(run: str, queue) -> None:
    t0 = time.perf_counter()
    save_routing_stats(compute_routing_stats(run), figures=False)
    secs = time.perf_counter() - t0
    # this process's own high-water mark (VmHWM starts afresh at exec; ru_maxrss of a child would
    # carry the parent's peak across the fork)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    queue.put((secs, hwm_kb / 1e6))


if __name__ == "__main__":
    main()
