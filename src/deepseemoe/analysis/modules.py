"""Modules of a sparse graph: community detection, its significance against degree-preserving
rewiring, and its alignment with known labels (experts, domains).

- Louvain communities (networkx, BSD) on the undirected weighted graph, seeded; modularity Q of
  the partition found.
- Significance: the same detection on `draws` degree-preserving rewirings of the graph (double
  edge swaps, 10 per edge; each edge keeps its weight), z = (Q − mean Q_rewired) / std Q_rewired.
  A graph that falls apart into modules has z ≫ 0; a random graph of the same degrees, z ≈ 0.
  A bare Q is not evidence: Louvain finds Q ≈ 0.3–0.4 in sparse random graphs.
- Alignment: NMI(module; label) over the nodes that carry the label (arithmetic normalisation,
  as sklearn's default).

Shapes: a graph of N nodes and M edges; labels are {node: label}.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from deepseemoe.errors import DeepSeeMoEError


@dataclass
class Modules:
    communities: list[set]  # largest first
    modularity: float
    rewired_modularity: list[float]  # one per rewiring draw
    z: float  # (modularity − mean rewired) / std rewired; inf when every rewiring gave the same Q
    nodes: int
    edges: int

    def membership(self) -> dict:
        return {n: i for i, c in enumerate(self.communities) for n in c}


def louvain(graph, seed: int = 0, resolution: float = 1.0) -> tuple[list[set], float]:
    """Louvain communities (largest first) and their modularity, on edge attribute "weight"."""
    import networkx as nx

    if graph.number_of_edges() == 0:
        raise DeepSeeMoEError("the graph has no edges above the threshold; lower the threshold")
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    communities = sorted(communities, key=lambda c: (-len(c), min(map(str, c))))
    return communities, float(nx.community.modularity(graph, communities, weight="weight", resolution=resolution))


def rewired(graph, seed: int):
    """A degree-preserving rewiring: 10·M double edge swaps; weights travel with their edges."""
    import random

    import networkx as nx

    g = nx.Graph(graph)
    m = g.number_of_edges()
    if m >= 2 and len(g) >= 4:
        weights = [d.get("weight", 1.0) for _, _, d in g.edges(data=True)]
        nx.double_edge_swap(g, nswap=10 * m, max_tries=100 * m, seed=seed)
        # the swap keeps each node's degree; its weights are the original multiset, shuffled
        random.Random(seed).shuffle(weights)
        for (u, v), w in zip(g.edges(), weights, strict=True):
            g[u][v]["weight"] = w
    return g


def find_modules(graph, *, draws: int = 10, seed: int = 0) -> Modules:
    """Louvain modules of `graph` and the z-score of their modularity against `draws` rewirings."""
    communities, q = louvain(graph, seed)
    baseline = [louvain(rewired(graph, seed + 1 + i), seed)[1] for i in range(draws)]
    mean = sum(baseline) / len(baseline)
    std = math.sqrt(sum((b - mean) ** 2 for b in baseline) / max(len(baseline) - 1, 1))
    z = (q - mean) / std if std > 0 else (math.inf if q > mean else 0.0)
    return Modules(communities, q, baseline, z, graph.number_of_nodes(), graph.number_of_edges())


def nmi(a: dict, b: dict) -> float:
    """NMI between two labelings over their common nodes: I(A;B) / ((H(A) + H(B)) / 2); 1 when both
    are constant (one class each), 0 when only one is."""
    common = [n for n in a if n in b]
    if not common:
        raise DeepSeeMoEError("the two labelings share no node")
    n = len(common)
    pa = Counter(a[x] for x in common)
    pb = Counter(b[x] for x in common)
    pab = Counter((a[x], b[x]) for x in common)

    def entropy(c: Counter) -> float:
        return -sum(v / n * math.log(v / n) for v in c.values())

    ha, hb = entropy(pa), entropy(pb)
    mi = sum(v / n * math.log(v * n / (pa[i] * pb[j])) for (i, j), v in pab.items())
    if ha == 0 and hb == 0:
        return 1.0
    if ha == 0 or hb == 0:
        return 0.0
    return max(0.0, mi / ((ha + hb) / 2))
