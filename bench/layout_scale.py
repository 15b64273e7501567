"""Benchmark: force-directed layout of large sparse graphs — the curve of seconds over graph size, and
the ratio against networkx's own ForceAtlas2 (its defaults) where that one finishes.

    python bench/layout_scale.py                       # 1e4 … 3e6 edges, 100 iterations
    python bench/layout_scale.py --sizes 1e4,1e5,1e6,1e7 --iterations 100 --peer-max 3e4

Graphs are planted: N = M / 8 nodes in communities of ~2,000 (at least 8); each edge leaves a
uniform node and stays in its community with probability 0.9. Quality is the separation of the
communities in the layout (mean distance to the community's centre / mean distance between centres,
lower is better), printed beside each time so that speed is never bought with a worse picture.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deepseemoe.graphs.layout import forceatlas2


def planted(m: int, seed: int = 0) -> tuple[int, np.ndarray, np.ndarray]:
    n = max(m // 8, 16)
    blocks = max(8, n // 2000)
    g = np.random.default_rng(seed)
    labels = g.integers(0, blocks, n)
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(blocks + 1))
    src = g.integers(0, n, m)
    lo, hi = starts[labels[src]], starts[labels[src] + 1]
    inside = g.random(m) < 0.9
    dst = np.where(inside, order[lo + (g.random(m) * (hi - lo)).astype(np.int64)], g.integers(0, n, m))
    edges = np.stack([src, dst], 1)[src != dst]
    return n, edges, labels


def separation(pos: np.ndarray, labels: np.ndarray) -> float:
    ks = np.unique(labels)
    centres = np.array([pos[labels == k].mean(0) for k in ks])
    intra = np.mean([np.linalg.norm(pos[labels == k] - centres[i], axis=1).mean() for i, k in enumerate(ks)])
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    return float(intra / d[np.triu_indices(len(ks), 1)].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6,3e6", help="edge counts, comma-separated")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--peer-max", type=float, default=3e4, help="largest graph networkx's layout is run on")
    args = ap.parse_args()
    import networkx as nx

    print(f"{'edges':>10} {'nodes':>9} {'ours s':>8} {'ms/iter':>8} {'separation':>10} {'networkx s':>10} "
          f"{'its sep.':>8} {'ratio':>6}")
    for m in (int(float(s)) for s in args.sizes.split(",")):
        n, edges, labels = planted(m)
        t = time.perf_counter()
        pos = forceatlas2(n, edges, iterations=args.iterations)
        ours = time.perf_counter() - t
        peer = peer_sep = ratio = ""
        if m <= args.peer_max:
            graph = nx.Graph()
            graph.add_nodes_from(range(n))
            graph.add_edges_from(edges.tolist())
            t = time.perf_counter()
            theirs = nx.forceatlas2_layout(graph, max_iter=args.iterations, seed=0)
            took = time.perf_counter() - t
            peer, ratio = f"{took:10.1f}", f"{took / ours:5.1f}×"
            peer_sep = f"{separation(np.array([theirs[i] for i in range(n)]), labels):8.3f}"
        print(f"{len(edges):>10,} {n:>9,} {ours:8.1f} {1000 * ours / args.iterations:8.0f} "
              f"{separation(pos, labels):10.3f} {peer:>10} {peer_sep:>8} {ratio:>6}", flush=True)


if __name__ == "__main__":
    main()
