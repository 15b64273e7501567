"""Modules of a sparse graph: community detection, its significance against a rewiring that keeps
the graph's own constraints, and its alignment with known labels (experts, domains) against a
label-shuffle null.

- Louvain communities (networkx, BSD) on the undirected weighted graph, seeded; modularity Q of
  the partition found.
- Significance: the same detection on `draws` degree-preserving rewirings of the graph (10 double
  edge swaps per edge), z = (Q − mean Q_rewired) / std Q_rewired. A graph that falls apart into
  modules has z ≫ 0; a random graph of the same constraints, z ≈ 0. A bare Q is not evidence:
  Louvain finds Q ≈ 0.3–0.4 in sparse random graphs.
- The null must keep what the graph cannot help having. A layered graph (edges only between
  consecutive layers) or a bipartite one (features ↔ experts) has modules "for free" along its
  layers or sides; a rewiring that moves edges across layers destroys that structure and makes any
  real layered graph look modular (random weights: z = 35 at 6 layers). So nodes may carry a
  *part* (their layer, their kind): edges are then swapped only with edges that join the same two
  parts, which keeps every node's degree toward every other part. A swap (a1, b1), (a2, b2) →
  (a1, b2), (a2, b1) leaves each weight with its side-A node, so the side-A nodes (a layer's
  writers) keep their strength too; a null that shuffled weights freely would erase the strength
  differences between neurons that modularity's expectation term depends on.
- Alignment: NMI(module; label) over the nodes that carry the label (arithmetic normalisation, as
  sklearn's default), beside the same NMI with the labels shuffled within each stratum (the layer:
  an expert label that includes its layer carries depth, which modules of a layered graph follow
  whatever the experts are). Excess = NMI − mean shuffled NMI; z against the shuffles.

Shapes: a graph of N nodes and M edges; labels and parts are {node: label}.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.measures import mutual_information


@dataclass
class Modules:
    communities: list[set]  # largest first
    modularity: float
    rewired_modularity: list[float]  # one per rewiring draw
    z: float  # (modularity − mean rewired) / std rewired; inf when every rewiring gave the same Q
    nodes: int
    edges: int
    null: str  # what the rewirings kept, in words

    def membership(self) -> dict:
        return {n: i for i, c in enumerate(self.communities) for n in c}

    @property
    def rewired_mean(self) -> float:
        return sum(self.rewired_modularity) / len(self.rewired_modularity)


@dataclass
class Alignment:
    """NMI of modules with a labelling, against the same labels shuffled within strata."""

    nmi: float
    null_mean: float
    null_std: float
    draws: int

    @property
    def excess(self) -> float:
        return self.nmi - self.null_mean

    @property
    def z(self) -> float:
        return _z(self.nmi, self.null_mean, self.null_std)

    def as_dict(self, prefix: str) -> dict:
        return {prefix: self.nmi, f"{prefix}_null": self.null_mean, f"{prefix}_excess": self.excess,
                f"{prefix}_z": self.z}


def _z(value: float, mean: float, std: float) -> float:
    if std > 0:
        return (value - mean) / std
    return math.inf if value > mean + 1e-12 else (-math.inf if value < mean - 1e-12 else 0.0)


def louvain(graph, seed: int = 0, resolution: float = 1.0) -> tuple[list[set], float]:
    """Louvain communities (largest first) and their modularity, on edge attribute "weight"."""
    import networkx as nx

    if graph.number_of_edges() == 0:
        raise DeepSeeMoEError("the graph has no edges above the threshold; lower the threshold")
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    communities = sorted(communities, key=lambda c: (-len(c), min(map(str, c))))
    return communities, float(nx.community.modularity(graph, communities, weight="weight", resolution=resolution))


def _swap(edges: list[tuple], rng: random.Random, bipartite: bool) -> None:
    """10·m double edge swaps in place: (a1, b1), (a2, b2) → (a1, b2), (a2, b1) when the four nodes
    differ and neither new edge exists. `bipartite`: every edge is stored (side A, side B) and keeps
    that orientation, so no edge ever joins two nodes of one side; otherwise the second edge is
    read either way round (the general swap)."""
    m = len(edges)
    if m < 2:
        return
    present = {frozenset(e) for e in edges}
    done, tries = 0, 0
    while done < 10 * m and tries < 100 * m:
        tries += 1
        i, j = rng.randrange(m), rng.randrange(m)
        a1, b1 = edges[i]
        a2, b2 = edges[j]
        if not bipartite and rng.random() < 0.5:
            a2, b2 = b2, a2
        if len({a1, b1, a2, b2}) < 4:
            continue
        n1, n2 = frozenset((a1, b2)), frozenset((a2, b1))
        if n1 in present or n2 in present:
            continue
        present.discard(frozenset((a1, b1)))
        present.discard(frozenset((a2, b2)))
        present.add(n1)
        present.add(n2)
        edges[i], edges[j] = (a1, b2), (a2, b1)  # each slot keeps its first node
        done += 1


def _before(a, b) -> bool:
    """a sorts before b: natively (layer 9 before layer 10), else by repr."""
    try:
        return bool(a < b)
    except TypeError:
        return repr(a) < repr(b)


def rewired(graph, seed: int, part: Callable[[Hashable], Hashable] | None = None):
    """A degree-preserving rewiring of `graph` (networkx). With `part` (node → its layer or kind),
    edges are swapped only with edges joining the same two parts: each node keeps its degree toward
    every part, a layered graph stays layered and a bipartite one bipartite. Each weight stays with
    its edge's side-A node (the first part of the pair), whose strength is kept."""
    import networkx as nx

    rng = random.Random(seed)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    weights: dict[tuple, list[float]] = defaultdict(list)
    for u, v, d in graph.edges(data=True):
        pu, pv = (part(u), part(v)) if part else (0, 0)
        if pu != pv and not _before(pu, pv):  # one orientation per pair of parts: (side A, side B)
            u, v, pu, pv = v, u, pv, pu
        groups[(pu, pv)].append((u, v))
        weights[(pu, pv)].append(d.get("weight", 1.0))
    g = nx.Graph()
    g.add_nodes_from(graph.nodes(data=True))
    for key in sorted(groups, key=repr):
        edges, ws = groups[key], weights[key]
        _swap(edges, rng, bipartite=key[0] != key[1])  # slot i keeps its side-A node, and so its weight
        g.add_edges_from((u, v, {"weight": w}) for (u, v), w in zip(edges, ws, strict=True))
    return g


def find_modules(graph, *, draws: int = 10, seed: int = 0, part: Callable[[Hashable], Hashable] | None = None,
                 null: str = "degree-preserving rewiring") -> Modules:
    """Louvain modules of `graph` and the z-score of their modularity against `draws` rewirings
    (`rewired`, with `part` when the graph is layered or bipartite; `null` names it for readers)."""
    communities, q = louvain(graph, seed)
    baseline = [louvain(rewired(graph, seed + 1 + i, part), seed)[1] for i in range(draws)]
    mean = sum(baseline) / len(baseline)
    std = math.sqrt(sum((b - mean) ** 2 for b in baseline) / max(len(baseline) - 1, 1))
    return Modules(communities, q, baseline, _z(q, mean, std), graph.number_of_nodes(), graph.number_of_edges(), null)


def _codes(values: list) -> np.ndarray:
    index: dict = {}
    return np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))


def _nmi_codes(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    return mutual_information(np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb))[1]


def nmi(a: dict, b: dict) -> float:
    """NMI between two labelings over their common nodes: I(A;B) / ((H(A) + H(B)) / 2); 1 when both
    are constant (one class each), 0 when only one is."""
    common = [n for n in a if n in b]
    if not common:
        raise DeepSeeMoEError("the two labelings share no node")
    return _nmi_codes(_codes([a[x] for x in common]), _codes([b[x] for x in common]))


def aligned(membership: dict, labels: dict, *, stratum: Callable[[Hashable], Hashable] | None = None,
            draws: int = 100, seed: int = 0) -> Alignment:
    """NMI(membership; labels) against `draws` shuffles of the labels among the nodes of each
    stratum (`stratum(node)`, e.g. its layer; all nodes one stratum when None): the shuffle keeps
    every label's count per stratum, so what the strata alone explain is in the null too."""
    common = [n for n in membership if n in labels]
    if not common:
        raise DeepSeeMoEError("the two labelings share no node")
    a, b = _codes([membership[x] for x in common]), _codes([labels[x] for x in common])
    strata = _codes([stratum(x) for x in common]) if stratum else np.zeros(len(common), dtype=np.int64)
    order = np.argsort(strata, kind="stable")
    bounds = np.flatnonzero(np.diff(strata[order])) + 1
    blocks = np.split(order, bounds)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(draws):
        shuffled = b.copy()
        for block in blocks:
            shuffled[block] = b[rng.permutation(block)]
        null.append(_nmi_codes(a, shuffled))
    mean = float(np.mean(null))
    std = float(np.std(null, ddof=1)) if draws > 1 else 0.0
    return Alignment(_nmi_codes(a, b), mean, std, draws)
