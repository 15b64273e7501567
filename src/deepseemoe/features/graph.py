"""The sparse graph of a dictionary's features and the experts of the MoE layer it feeds, from the
exact or measured paths `map` already computed, and its modules (`graphs.modules`).

Nodes: "f{i}" for feature i, "E{j}" for expert j of the mapped layer. Edges, undirected, one kind
per source table of `map` (each with its own explicit threshold, reported with what it kept):
- router: feature i → expert j when the feature's mean push on j's router logit while active
  (router_attribution.mean_push_when_active, exact: decoder row through W_r) is ≥ `router_min`;
- routing: feature i ↔ expert j when the tokens it fires on go to j at least `lift_min` times as
  often as all tokens do (feature_experts.lift, with ≥ `count_min` tokens); weight P(e | f);
- composition: expert j → feature i when the feature carries ≥ `share_min` of the expert's output
  (expert_composition.share, transcoders).
- feature (with an upstream dictionary of the same run at an earlier layer): upstream feature "u{i}"
  → feature j with the virtual weight of the direct residual path, |d_i · e_j| (the upstream
  decoder row, the downstream encoder column, scales folded, norms in between ignored): for each
  downstream feature its `fan_in` strongest upstream features with |w| ≥ `link_min` (`feature_links`).
Parallel edges of several kinds add their weights. Labels for alignment: each feature's top expert
(features.top_expert) and, when the routing run's statistics are given, the domain whose slots
favour that expert most (largest lift over uniform).

Shapes: map tables one row per (feature, expert); the graph N = F_kept + E nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.graphs.modules import Modules, aligned, find_modules


@dataclass
class Thresholds:
    router_min: float = 0.05  # logit units
    lift_min: float = 2.0
    count_min: int = 5
    share_min: float = 0.02
    link_min: float = 0.1  # feature edges: least |d_i · e_j| (coder units, scales folded)
    fan_in: int = 3  # feature edges: strongest upstream features kept per downstream feature


@dataclass
class EdgeKind:
    kind: str
    candidates: int  # positive-weight rows of the source table
    kept: int
    mass: float  # total weight of the candidates
    mass_kept: float

    @property
    def mass_share(self) -> float:
        return self.mass_kept / self.mass if self.mass > 0 else 0.0


@dataclass
class FeatureGraph:
    graph: object  # networkx.Graph
    layer: int
    edge_kinds: list[EdgeKind]
    top_expert: dict[str, str]  # feature node -> its top expert's node
    domain: dict[str, str]  # node -> domain (when statistics were given)


def _frame(columns: dict[str, list] | None):
    import pandas as pd

    return None if columns is None else pd.DataFrame(columns)


# where a dictionary writes into the residual stream (its decoder adds there) and where it reads from it
WRITES = {"resid_in": 0, "resid_out": 1, "block_out": 1}  # site -> position after the layer's start
READS = {"resid_in": 0, "block_in": 0.5, "resid_out": 1}


def feature_links(upstream, up_site, downstream, down_site, thresholds: Thresholds | None = None):
    """Virtual weights of the direct residual path from an upstream dictionary's features to a
    downstream one's, as rows (up_feature, feature, weight ≥ 0) kept by `thresholds` (fan_in, link_min),
    and (candidates, kept, mass, mass kept) for the report."""
    import numpy as np

    t = thresholds or Thresholds()
    if up_site.kind not in WRITES or down_site.kind not in READS:
        raise DeepSeeMoEError(f"feature edges link a dictionary that writes the residual stream ({', '.join(WRITES)}) "
                              f"to one that reads it ({', '.join(READS)}); got {up_site.kind} → {down_site.kind}")
    if up_site.layer + WRITES[up_site.kind] > down_site.layer + READS[down_site.kind]:
        raise DeepSeeMoEError(f"the upstream dictionary ({up_site.kind} of layer {up_site.layer}) must write before "
                              f"the downstream one reads ({down_site.kind} of layer {down_site.layer})")
    up, down = upstream.folded(), downstream.folded()
    if up.cfg.out_dim != down.cfg.d_in:
        raise DeepSeeMoEError("the two dictionaries' sites have different widths")
    w = (up.W_dec.detach().double() @ down.W_enc.detach().double()).abs().numpy()  # [F_up, F_down]
    k = min(t.fan_in, w.shape[0])
    top = np.argpartition(-w, k - 1, axis=0)[:k]  # per downstream feature, its k strongest inputs
    rows = [(int(i), int(j), float(w[i, j])) for j in range(w.shape[1]) for i in top[:, j] if w[i, j] >= t.link_min]
    kept = sum(r[2] for r in rows)
    return rows, EdgeKind("feature", int((w > 0).sum()), len(rows), float(w.sum()), kept)


def build_graph(summary: dict, tables: dict[str, dict[str, list] | None], thresholds: Thresholds | None = None,
                domain_table=None, links: tuple[list, EdgeKind] | None = None) -> FeatureGraph:
    """The graph of one map: its summary and tables as `DictionaryRun.map_summary` / `map_tables`
    read them; `domain_table`: the routing run's analyses "domain" table, to label experts (and
    features, by their top expert) with a domain; `links`: `feature_links` from an upstream dictionary."""
    import networkx as nx

    t = thresholds or Thresholds()
    layer, E = int(summary["layer"]), int(summary["num_experts"])
    g = nx.Graph()
    g.add_nodes_from((f"E{j}", {"kind": "expert"}) for j in range(E))
    kinds = []

    def add(kind: str, rows, weight_col: str, keep) -> None:
        if rows is None:
            return
        rows = rows[rows[weight_col] > 0]
        kept = rows[keep(rows)]
        kinds.append(EdgeKind(kind, len(rows), len(kept), float(rows[weight_col].sum()), float(kept[weight_col].sum())))
        for f, e, w in zip(kept["feature"], kept["expert"], kept[weight_col], strict=True):
            u, v = f"f{int(f)}", f"E{int(e)}"
            g.add_node(u, kind="feature")
            if g.has_edge(u, v):
                g[u][v]["weight"] += float(w)
            else:
                g.add_edge(u, v, weight=float(w))

    add("router", _frame(tables.get("router_attribution")), "mean_push_when_active",
        lambda r: r["mean_push_when_active"] >= t.router_min)
    add("routing", _frame(tables.get("feature_experts")), "p_e_given_f",
        lambda r: (r["lift"] >= t.lift_min) & (r["count"] >= t.count_min))
    add("composition", _frame(tables.get("expert_composition")), "share", lambda r: r["share"] >= t.share_min)
    if links is not None:
        rows, kind = links
        kinds.append(kind)
        for i, j, w in rows:
            u, v = f"u{i}", f"f{j}"
            g.add_node(u, kind="upstream_feature")
            g.add_node(v, kind="feature")
            g.add_edge(u, v, weight=g[u][v]["weight"] + w if g.has_edge(u, v) else w)
    if not kinds:
        raise DeepSeeMoEError("the map holds none of router_attribution, feature_experts, expert_composition; "
                              "run `deepseemoe map` again")
    features = _frame(tables.get("features"))
    top = {f"f{int(f)}": f"E{int(e)}" for f, e in zip(features["feature"], features["top_expert"], strict=True)
           if f"f{int(f)}" in g and e == e and e >= 0} if features is not None else {}
    domain: dict[str, str] = {}
    if domain_table is not None:
        sub = domain_table[domain_table["layer"] == layer]
        for e, rows in sub.groupby("expert"):
            domain[f"E{int(e)}"] = str(rows.sort_values("lift_over_uniform", ascending=False)["domain"].iloc[0])
        domain.update({f: domain[e] for f, e in top.items() if e in domain})
    return FeatureGraph(g, layer, kinds, top, domain)


NULL = "rewired within each kind of edge (feature–expert, upstream–feature), degrees per kind kept"


def _kind(node: str) -> str:
    return node[0]  # "f" feature, "E" expert, "u" upstream feature


def graph_modules(fg: FeatureGraph, draws: int = 10, seed: int = 0, label_draws: int = 200) -> tuple[Modules, dict]:
    """Modules of the graph (isolated nodes left out) and their summary: modularity against
    rewirings that keep the graph bipartite (features ↔ experts; upstream ↔ features), NMI with the
    features' top experts and with domains against `label_draws` shuffles of those labels among the
    features, edge kinds with what they kept."""
    g = fg.graph.copy()
    g.remove_nodes_from([n for n in list(g) if g.degree(n) == 0])
    modules = find_modules(g, draws=draws, seed=seed, part=_kind, null=NULL)
    member = modules.membership()
    feats = {n: m for n, m in member.items() if n.startswith("f")}
    summary = {
        "layer": fg.layer, "nodes": modules.nodes, "edges": modules.edges,
        "features": len(feats), "experts": sum(1 for n in member if n.startswith("E")),
        "modules": len(modules.communities), "largest_module": len(modules.communities[0]),
        "modularity": modules.modularity, "rewired_modularity_mean": modules.rewired_mean,
        "rewired_modularity": modules.rewired_modularity, "z": modules.z, "draws": draws, "null": NULL,
        "nmi_module_top_expert": None, "nmi_module_domain": None,
        "edge_kinds": [{**asdict(k), "mass_share": k.mass_share} for k in fg.edge_kinds],
    }
    for key, labels in (("nmi_module_top_expert", fg.top_expert), ("nmi_module_domain", fg.domain)):
        if feats and any(f in labels for f in feats):
            summary.update(aligned(feats, labels, draws=label_draws, seed=seed).as_dict(key))
    return modules, summary


def layout_positions(fg: FeatureGraph, seed: int = 0, iterations: int = 200) -> dict[str, tuple[float, float]]:
    """ForceAtlas2 positions (`graphs.layout.forceatlas2`) of the graph's connected nodes, on edge weights."""
    import numpy as np

    from deepseemoe.graphs.layout import forceatlas2

    g = fg.graph.subgraph([n for n in fg.graph if fg.graph.degree(n) > 0])
    nodes = list(g)
    index = {n: i for i, n in enumerate(nodes)}
    edges = np.array([(index[u], index[v]) for u, v in g.edges()], dtype=np.int64).reshape(-1, 2)
    weights = np.array([d.get("weight", 1.0) for _, _, d in g.edges(data=True)])
    xy = forceatlas2(len(nodes), edges, weights, iterations=iterations, seed=seed)
    return {n: (float(xy[i, 0]), float(xy[i, 1])) for n, i in index.items()}


def graph_tables(fg: FeatureGraph, modules: Modules, positions: dict[str, tuple[float, float]] | None = None) -> dict:
    """nodes (node, kind, module, top_expert, domain, x, y) and edges (u, v, weight) as arrow tables
    (x, y: `layout_positions`, null for a node without edges or without a layout)."""
    import pyarrow as pa

    member = modules.membership()
    nodes = sorted(fg.graph.nodes)
    where = positions or {}
    node_table = pa.table({"node": nodes, "kind": [fg.graph.nodes[n].get("kind", "") for n in nodes],
                           "module": pa.array([member.get(n) for n in nodes], pa.int32()),
                           "top_expert": [fg.top_expert.get(n) for n in nodes],
                           "domain": [fg.domain.get(n) for n in nodes],
                           "x": pa.array([where[n][0] if n in where else None for n in nodes], pa.float64()),
                           "y": pa.array([where[n][1] if n in where else None for n in nodes], pa.float64())})
    edges = sorted(fg.graph.edges(data="weight"))
    edge_table = pa.table({"u": [u for u, _, _ in edges], "v": [v for _, v, _ in edges],
                           "weight": pa.array([w for _, _, w in edges], pa.float64())})
    return {"nodes": node_table, "edges": edge_table}


def layout_png(fg: FeatureGraph, modules: Modules, positions: dict[str, tuple[float, float]], name: str = "") -> bytes:
    """The laid-out graph (`layout_positions`) of dictionary `name`, nodes coloured by module (a legend
    names the largest modules), experts drawn as squares labelled beside them."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    g = fg.graph.subgraph([n for n in fg.graph if n in positions])
    pos = positions
    member = modules.membership()
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(8, 8), dpi=110)
    for u, v in g.edges():
        ax.plot([pos[u][0], pos[v][0]], [pos[u][1], pos[v][1]], color="#bbb", lw=0.3, zorder=1)
    feats = [n for n in g if not n.startswith("E")]  # this dictionary's features and any upstream ones
    experts = [n for n in g if n.startswith("E")]
    ax.scatter([pos[n][0] for n in feats], [pos[n][1] for n in feats], s=6, zorder=2,
               c=[cmap(member[n] % 20) for n in feats])
    ax.scatter([pos[n][0] for n in experts], [pos[n][1] for n in experts], s=80, marker="s", zorder=3,
               c=[cmap(member[n] % 20) for n in experts], edgecolors="black")
    for n in experts:  # beside the marker, on a white box: never hidden under it or under the features
        ax.annotate(n, pos[n], xytext=(6, 6), textcoords="offset points", fontsize=7, zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    shown = list(enumerate(modules.communities))[:12]
    handles = [Line2D([], [], marker="o", ls="", color=cmap(i % 20),
                      label=f"module {i}: {sum(not n.startswith('E') for n in c):,} features, "
                            f"{sum(n.startswith('E') for n in c)} experts") for i, c in shown]
    more = len(modules.communities) - len(shown)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False,
              title=f"modules (largest first{f'; {more} more' if more > 0 else ''})", title_fontsize=7)
    what = f"{name}, " if name else ""
    ax.set_title(f"{what}layer {fg.layer}: {len(feats):,} features, {len(experts)} experts, "
                 f"{len(modules.communities)} modules (z = {modules.z:.1f} against bipartite rewirings)", fontsize=9)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class GraphStudy:
    """What `deepseemoe graph` computes for one map: the tables `DictionaryRun.save_graph` writes, the
    summary (modules, modularity against rewired graphs, NMI against shuffled labels) and the figure."""

    tables: dict
    summary: dict
    figure: bytes | None


def graph_study(summary: dict, tables: dict[str, dict[str, list] | None], thresholds: Thresholds | None = None,
                domain_table=None, links: tuple[list, EdgeKind] | None = None, *, draws: int = 10, seed: int = 0,
                figure: bool = True, name: str = "") -> GraphStudy:
    """The graph of one map (`build_graph`), its modules and their nulls (`graph_modules`), the layout
    stored with the nodes (the explorer draws the same one) and, with `figure`, its drawing. Refused
    (DeepSeeMoEError) when no edge passes the thresholds."""
    fg = build_graph(summary, tables, thresholds, domain_table, links)
    modules, found = graph_modules(fg, draws=draws, seed=seed)
    positions = layout_positions(fg, seed=seed)
    return GraphStudy(graph_tables(fg, modules, positions), found,
                      layout_png(fg, modules, positions, name) if figure else None)
