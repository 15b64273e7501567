"""What the explorer's pages show, read from run directories through runs/ and nothing else.

Every query is bounded, whatever the run's size: a page reads one analyses table (layers × experts
rows), one document's rows of one shard (sliced from the memory-mapped routing matrix), the first
shard of a layer (an expert's contexts), or one unit's rows of a map table (DuckDB, filtered on
the unit). Files are verified against their manifest once per server process, then read in slices.

Shapes: routing per layer (experts [T, K], weights [T, K]); map tables one row per (feature, expert).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepseemoe.data.token_text import joined_texts
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.report.components import Bar, Heatmap, Strip, expert_colors, show_token
from deepseemoe.runs.dictionary import DictionaryRun, earlier_names
from deepseemoe.runs.explanations import ExplanationStore
from deepseemoe.runs.routing import Analyses, RoutingRun
from deepseemoe.runs.study import Study, find_routing_run

DOC_TOKENS = 256  # tokens of a recorded document shown at once, at most
# routing cells (tokens × MoE layers) of one document page: each cell carries its experts and weights
# (~230 bytes of HTML), so a 16-layer model shows 128 tokens a page (~0.5 MB), a 4-layer one 256
DOC_CELLS = 2048
CONTEXTS = 12  # an expert's top contexts
WINDOW = (10, 4)  # tokens before / after a context's token
LIST = 20  # rows of a unit's lists (features of an expert, experts of a feature)


STATS_COLUMNS = {  # the analyses tables the pages read, and the columns they use
    "load": ["layer", "expert", "load", "weighted_load", "top1_share"],
    "domain": ["layer", "domain", "expert", "share", "lift_over_uniform"],
    "coactivation": ["layer", "expert_i", "expert_j", "p_j_given_i", "lift"],
    "vocab_top_tokens": ["layer", "expert", "rank", "token", "count", "share"],
}


def url_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


# ---- typed page contents -------------------------------------------------------------------------

@dataclass
class Context:
    doc: int
    pos: int
    domain: str
    left: str
    token: str
    right: str
    weight: float  # the expert's gate weight on the token
    rank: int  # the expert's rank among the token's top-k
    strip: Strip | None = None  # the window's routing at the page's layer
    center: int = 0  # the token's index in the strip


@dataclass
class FeatureLink:
    dictionary: str  # DictionaryView.key
    feature: int
    value: float  # what the list is sorted by (lift, share, logit per unit)
    detail: str
    description: str | None


@dataclass
class Example:
    activation: float
    text: str  # the context before the token
    token: str
    experts: list[int]  # the token's experts at the dictionary's layer


@dataclass
class TokenRow:
    """One example text with each token's activation (a feature's, or an expert's gate weight)."""

    tokens: list[tuple[str, float, str]]  # (shown text, activation, background)


@dataclass
class ExpertPage:
    layer: int
    expert: int
    num_experts: int
    top_k: int
    load: dict[str, float]  # load, weighted_load, top1_share
    top_tokens: list[Bar]
    contexts: list[Context]
    contexts_scanned: int
    domains: list[Bar]
    coactive: list[Bar]
    routed_by: list[FeatureLink]  # features whose tokens go to the expert (map lift)
    router_features: list[FeatureLink]  # features whose decoder raises its router logit
    writes: list[FeatureLink]  # features of its output (transcoder composition)
    description: str | None
    scores: dict[str, float]
    ablation: dict | None  # the `ablate` row of this expert
    ablation_domains: list[tuple[str, float, float]]  # (domain, ablation ΔCE, control ΔCE)
    explained_on: list[TokenRow]  # the examples its description was written from


@dataclass
class FeaturePage:
    dictionary: str
    feature: int
    features: int
    layer: int | None
    stats: dict
    experts: list[Bar]  # P(e | f)
    attribution: list[Bar]  # router logit per unit of activation
    top: list[Example]
    quantiles: list[list[Example]]
    description: str | None
    scores: dict[str, float]
    steering: list[dict]
    explained_on: list[TokenRow]  # the examples its description was written from


@dataclass
class SearchHit:
    kind: str  # "expert" | "feature"
    title: str
    link: str
    text: str


class NotServed(Exception):
    """A request names a study, figure or page that this server does not serve (404)."""


@dataclass
class DictionaryView:
    key: str  # URL id: "<run folder>.<coder name>"
    run: DictionaryRun
    name: str
    summary: dict  # maps/NAME/summary.json
    store: ExplanationStore | None
    graph: dict | None = None  # graphs/NAME/summary.json, when `graph` ran
    _examples: object = None  # pyarrow table sorted by feature, built on first use
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def layer(self) -> int | None:
        return self.summary.get("layer")

    @property
    def features(self) -> int:
        return int(self.summary.get("features", 0))

    def rows(self, stem: str, unit: tuple[str, int], columns: list[str] | None = None, *,
             order: tuple[tuple[str, bool], ...] = (), limit: int | None = LIST,
             at_least: tuple[str, int] | None = None) -> list[dict]:
        """One unit's rows of a map table (`DictionaryRun.map_rows`), `LIST` at most by default."""
        return self.run.map_rows(self.name, stem, unit, columns, order=order, limit=limit, at_least=at_least)

    def graph_data(self, study_key: str) -> dict:
        """graphs/NAME/ for the browser: nodes (id, kind, module, top expert, domain, x, y, link) as
        columns, edges as index pairs and weights, and each module's nodes. Nodes without a stored
        position (a graph written before positions were stored, or a node without edges) are left out."""
        if self.graph is None or self.run.table_path("graphs", self.name, "nodes") is None:
            raise NotServed(f"{self.key} has no graph; run `deepseemoe graph {self.run.path} --dictionary {self.name}`")
        nodes = self.run.graph_table(self.name, "nodes")
        if "x" not in nodes:
            raise DeepSeeMoEError(f"the graph of {self.key} was written without positions; run `deepseemoe graph "
                                  f"{self.run.path} --dictionary {self.name}` again")
        keep = [i for i, x in enumerate(nodes["x"]) if x is not None]
        index = {nodes["node"][i]: j for j, i in enumerate(keep)}
        edges = self.run.graph_table(self.name, "edges")
        pairs = [(index[u], index[v], w) for u, v, w in zip(edges["u"], edges["v"], edges["weight"], strict=True)
                 if u in index and v in index]

        upstream = self.graph.get("upstream")  # `graph --upstream`: that dictionary's features are "u{i}"
        upstream_key = url_id(f"{self.run.path.name}.{upstream}") if upstream else None

        def link(node: str, kind: str) -> str:
            if kind == "expert":
                return f"/s/{study_key}/expert/{self.layer}/{node[1:]}"
            if node.startswith("u") and upstream_key:
                return f"/s/{study_key}/feature/{upstream_key}/{node[1:]}"
            return f"/s/{study_key}/feature/{self.key}/{node[1:]}"

        col = {k: [nodes[k][i] for i in keep] for k in ("node", "kind", "module", "top_expert", "domain", "x", "y")}
        modules: dict[int, list[int]] = {}
        for j, m in enumerate(col["module"]):
            if m is not None:
                modules.setdefault(int(m), []).append(j)
        return {"dictionary": self.key, "layer": self.layer, **col,
                "link": [link(n, k) for n, k in zip(col["node"], col["kind"], strict=True)],
                "edges": [[a, b] for a, b, _ in pairs], "weights": [w for _, _, w in pairs],
                "modules": [{"module": m, "nodes": members} for m, members in sorted(modules.items())],
                "summary": {k: self.graph.get(k) for k in ("nodes", "edges", "modules", "modularity", "z")}}

    def examples(self):
        """The map's examples.json as one arrow table (feature, kind, quantile, rank, activation,
        text, token, experts), sorted by feature; parsed once, then sliced per feature."""
        with self._lock:
            if self._examples is None:
                import pyarrow as pa

                doc = self.run.map_examples(self.name)
                rows = [(int(key), kind, q, r, ex) for key, entry in doc.items()
                        for kind, q, group in [("top", -1, entry.get("top", [])),
                                               *(("quantile", q, g) for q, g in enumerate(entry.get("quantiles", [])))]
                        for r, ex in enumerate(group)]
                rows.sort(key=lambda x: (x[0], x[1] != "top", x[2], x[3]))
                cols = {"feature": [x[0] for x in rows], "kind": [x[1] for x in rows], "quantile": [x[2] for x in rows],
                        "rank": [x[3] for x in rows], "activation": [float(x[4]["activation"]) for x in rows],
                        "text": [str(x[4]["text"]) for x in rows], "token": [str(x[4]["token"]) for x in rows],
                        "experts": [[int(e) for e in x[4].get("experts", [])] for x in rows]}
                self._examples = pa.table(cols)
            return self._examples


class StudyView:
    """One served study: its routing run, analyses, dictionaries with maps, descriptions, ablation,
    comparison. Opened once at start; pages query it."""

    def __init__(self, key: str, path: Path):
        self.key = key
        self.path = path
        self.run_dir = find_routing_run(path)
        self.study = Study.open(self.run_dir)
        self.run: RoutingRun = self.study.run
        self.analyses: Analyses | None = None
        self.stats_note: str | None = None  # why there are no statistics to show
        try:
            self.analyses = self.run.analyses()
        except DeepSeeMoEError as exc:  # none yet, or stale: the routing pages still work
            self.stats_note = str(exc)
        self.tokens = sum(self.run.manifest.files[f"tokens/{p}"].rows or 0 for p in self.run.parts)
        meta = self.run.meta
        model = str(meta.get("model", ""))
        # the model by name (a zoo model's folder is a cache path: its recipe and type say more)
        self.model_label = (f"the demo's {meta.get('model_type', 'MoE')} (recipe '{meta['recipe']}')"
                            if meta.get("recipe") else model)
        self.model_path = model
        self.layers = list(self.run.layers)
        self.num_experts = max(self.run.num_experts.values())
        self.colors, self.text_colors = expert_colors(self.num_experts)
        self.doc_tokens = max(32, min(DOC_TOKENS, DOC_CELLS // max(len(self.layers), 1)))
        self.dictionaries: dict[str, DictionaryView] = {}
        self.dictionary_aliases: dict[str, str] = {}  # "FOLDER.NAME", the key of earlier versions -> key
        stores = {(s.path.resolve(), s.module): s for s in self.study.explanations}
        names = [name for files in self.study.dictionary_runs for name in files.maps]
        for files in self.study.dictionary_runs:
            run = DictionaryRun(files.path)
            for name, summary in files.maps.items():
                # the name `map`, `explain` and `steer` take; with its run folder only when two runs share it
                key = name if names.count(name) == 1 else url_id(f"{files.path.name}.{name}")
                store = next((s for (p, m), s in stores.items() if m == name and p.is_relative_to(files.path.resolve())),
                             None)
                self.dictionaries[key] = DictionaryView(key, run, name, summary, store, files.graphs.get(name))
                for alias in (url_id(f"{files.path.name}.{name}"), *earlier_names(name)):
                    self.dictionary_aliases.setdefault(alias, key)
        # attribution graphs (`attribute`, the demo) by URL key: the slug, with its folder when two share it
        self.attribution: dict[str, tuple[Path, dict]] = {}
        entries = [(r.folder, e) for r in self.study.results.get("attribution", []) for e in r.doc["graphs"]]
        slugs = [e["slug"] for _, e in entries]
        for folder, e in entries:
            key = e["slug"] if slugs.count(e["slug"]) == 1 else url_id(f"{folder.name}.{e['slug']}")
            self.attribution[key] = (folder, e)
        self.expert_stores: dict[int, ExplanationStore] = {}
        for s in self.study.explanations:
            m = re.fullmatch(r"layer(\d+)\.experts", s.module)
            if m:
                self.expert_stores[int(m.group(1))] = s
        # what `_kept` read: analyses tables by name; descriptions, examples and scores by store; steering
        self._tables: dict[object, object] = {}
        self._docs: dict[str, np.ndarray] = {}  # part -> doc column
        self._shard_tokens: dict[str, object] = {}  # part -> tokens table (doc, pos, token, domain), LRU of 2
        self._first_docs: list[tuple[str, int]] | None = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Everything a first page would otherwise wait for, done now: the sha256 of every file the
        pages read (tokens and routing matrix shards; a 1M-token shard of 16 layers × top-8 is ~1 GB to
        hash), and the examples tables and descriptions of every dictionary and expert layer."""
        for part in self.run.parts:
            self.run.verified_path(f"tokens/{part}")
            self.run.verified_path(f"matrix/{part.replace('.parquet', '.safetensors')}")
        for view in self.dictionaries.values():
            view.examples()
            self.descriptions(view.store)
        for store in self.expert_stores.values():
            self.descriptions(store)
        self.first_documents()

    # ---- small, verified, cached reads -----------------------------------------------------------

    def _kept(self, key, read):
        """`read()` the first time `key` is asked for, then what it returned: a run's files are read
        once per explorer, not on every page view."""
        if key not in self._tables:
            self._tables[key] = read()
        return self._tables[key]

    def table(self, name: str):
        """An analyses table (layers × experts rows at most), verified and kept; empty without statistics."""
        def read():
            if self.analyses is None:
                import pandas as pd

                return pd.DataFrame(columns=STATS_COLUMNS[name])
            return self.analyses.table(name)
        return self._kept(name, read)

    def doc_column(self, part: str) -> np.ndarray:
        with self._lock:
            if part not in self._docs:
                self._docs[part] = self.run.read_columns("tokens", part, ["doc"])["doc"].to_numpy()
            return self._docs[part]

    def shard_tokens(self, part: str):
        with self._lock:
            if part not in self._shard_tokens:
                if len(self._shard_tokens) >= 2:
                    self._shard_tokens.pop(next(iter(self._shard_tokens)))
                self._shard_tokens[part] = self.run.read_columns("tokens", part, ["doc", "pos", "token", "domain"])
            return self._shard_tokens[part]

    def descriptions(self, store: ExplanationStore | None) -> dict[int, str]:
        if store is None:
            return {}
        return self._kept(("descriptions", id(store)), store.explanations)

    def explained_on(self, store: ExplanationStore | None, unit: int, limit: int = 10) -> list[TokenRow]:
        """The token-level examples `explain` showed the explainer for this unit, shaded by activation."""
        if store is None or not store.has_examples:
            return []
        units = self._kept(("examples", id(store)), lambda: store.examples().get("units", {}))
        rows = []
        for ex in units.get(str(unit), {}).get("train", [])[:limit]:
            acts = [float(a) for a in ex["activations"]]
            top = max(acts, default=0.0) or 1.0
            rows.append(TokenRow([(show_token(t), a, _yellow(a / top)) for t, a in zip(ex["tokens"], acts, strict=True)]))
        return rows

    def steering(self, view) -> list[dict]:
        """The `steer` results of a dictionary, read once."""
        return self._kept(("steering", view.run.path, view.name), lambda: view.run.steering(view.name))

    def unit_scores(self, store: ExplanationStore | None, unit: int) -> dict[str, float]:
        table = self._kept(("units", id(store)), store.units_table) if store is not None else None
        if table is None:
            return {}
        import pyarrow.compute as pc

        row = table.filter(pc.equal(table["unit"], unit)).to_pylist()
        if not row:
            return {}
        return {k.removesuffix("_balanced_accuracy"): float(v) for k, v in row[0].items()
                if k.endswith("_balanced_accuracy") and v is not None and v == v}

    # ---- links ------------------------------------------------------------------------------------

    def expert_link(self, layer: int, expert: int) -> str:
        return f"/s/{self.key}/expert/{layer}/{expert}"

    def feature_link(self, dictionary: str, feature: int) -> str:
        return f"/s/{self.key}/feature/{dictionary}/{feature}"

    def attribution_page(self, key: str) -> tuple[dict, object]:
        """One attribution graph's index entry and its drawing, nodes linked to their pages."""
        from deepseemoe.report.graph_svg import graph_svg
        from deepseemoe.runs.study import read_attribution_graph

        if key not in self.attribution:
            raise NotServed(f"no attribution graph {key!r}; known: {', '.join(self.attribution) or 'none'}")
        folder, entry = self.attribution[key]
        doc = read_attribution_graph(folder, entry)

        def href(node: dict) -> str | None:
            if node["kind"] in ("router", "expert") and node["layer"] in self.layers:
                return self.expert_link(node["layer"], node["index"])
            if node["kind"] == "feature":
                name = node.get("dictionary")
                key = self.dictionary_aliases.get(name, name)
                if key in self.dictionaries:
                    return self.feature_link(key, node["index"])
            return None

        return entry, graph_svg(doc, href=href)

    # ---- overview --------------------------------------------------------------------------------

    def load_heatmap(self) -> Heatmap:
        load = self.table("load")
        values = [[0.0] * self.num_experts for _ in self.layers]
        for layer, e, v in zip(load["layer"], load["expert"], load["load"], strict=True):
            values[self.layers.index(int(layer))][int(e)] = float(v)
        return Heatmap([f"layer {la}" for la in self.layers], [f"E{e}" for e in range(self.num_experts)], values,
                       caption="share of slots", fmt="%.3f",
                       links=[[self.expert_link(la, e) for e in range(self.num_experts)] for la in self.layers])

    def domain_heatmap(self, layer: int) -> Heatmap:
        table = self.table("domain")
        sub = table[table["layer"] == layer]
        domains = sorted(set(sub["domain"]))
        values = [[0.0] * self.num_experts for _ in domains]
        for d, e, v in zip(sub["domain"], sub["expert"], sub["share"], strict=True):
            values[domains.index(d)][int(e)] = float(v)
        return Heatmap(domains, [f"E{e}" for e in range(self.num_experts)], values, caption="domain", fmt="%.2f",
                       links=[[self.expert_link(layer, e) for e in range(self.num_experts)] for _ in domains])

    def coactivation_heatmap(self, layer: int) -> Heatmap:
        table = self.table("coactivation")
        sub = table[table["layer"] == layer]
        E = self.run.num_experts[layer]
        values = [[float("nan")] * E for _ in range(E)]
        for i, j, p in zip(sub["expert_i"], sub["expert_j"], sub["p_j_given_i"], strict=True):
            values[int(i)][int(j)] = float(p)
        return Heatmap([f"E{i}" for i in range(E)], [f"E{j}" for j in range(E)], values,
                       caption="P(j | i)", fmt="%.2f")

    def first_documents(self) -> list[tuple[str, int]]:
        """(domain, doc) of the first document of each domain in the first shard."""
        if self._first_docs is None:
            import pyarrow.compute as pc

            t = self.shard_tokens(self.run.parts[0])
            domains = pc.fill_null(t["domain"], "(no domain)")
            table = t.select(["doc"]).append_column("domain", domains).group_by("domain").aggregate([("doc", "min")])
            self._first_docs = sorted(zip(table["domain"].to_pylist(), table["doc_min"].to_pylist(), strict=True))
        return self._first_docs

    # ---- a recorded document ---------------------------------------------------------------------

    def document(self, doc: int, start: int = 0) -> Strip:
        """Tokens [start, start + self.doc_tokens) of a routed document with their routing in every layer."""
        for part in self.run.parts:
            docs = self.doc_column(part)
            if not len(docs) or docs[0] > doc or docs[-1] < doc:
                continue
            lo, hi = int(np.searchsorted(docs, doc, "left")), int(np.searchsorted(docs, doc, "right"))
            if lo == hi:
                continue
            if start >= hi - lo:
                raise DeepSeeMoEError(f"document {doc} has {hi - lo} routed tokens; start below that")
            lo += max(start, 0)
            hi = min(hi, lo + self.doc_tokens)
            tokens = self.shard_tokens(part)["token"].slice(lo, hi - lo).to_pylist()
            routing = self.run.routing_rows(part, lo, hi)
            return Strip.from_arrays([t or "" for t in tokens], routing, label=f"document {doc}")
        raise DeepSeeMoEError(f"document {doc} is not in this run")

    # ---- an expert -------------------------------------------------------------------------------

    def expert_page(self, layer: int, expert: int) -> ExpertPage:
        if layer not in self.run.num_experts:
            raise DeepSeeMoEError(f"layer {layer} is not a MoE layer of this run; MoE layers: {self.layers}")
        E = self.run.num_experts[layer]
        if not 0 <= expert < E:
            raise DeepSeeMoEError(f"expert {expert} does not exist; layer {layer} has experts 0..{E - 1}")
        load = self.table("load")
        row = load[(load["layer"] == layer) & (load["expert"] == expert)]
        loads = {k: float(row[k].iloc[0]) for k in ("load", "weighted_load", "top1_share")} if len(row) else {}
        vocab = self.table("vocab_top_tokens")
        # share 0: never routed to the expert (statistics of earlier versions listed such tokens)
        sub = vocab[(vocab["layer"] == layer) & (vocab["expert"] == expert) & (vocab["share"] > 0)].sort_values("rank")
        top_tokens = [Bar(show_token(t), float(s), f"{s:.2f} of {c} occurrences")
                      for t, s, c in zip(sub["token"], sub["share"], sub["count"], strict=True)]
        dom = self.table("domain")
        sub = dom[(dom["layer"] == layer) & (dom["expert"] == expert)].sort_values("share", ascending=False)
        domains = [Bar(d, float(s), f"{s:.3f} of the domain's slots (lift {lift:.2f})")
                   for d, s, lift in zip(sub["domain"], sub["share"], sub["lift_over_uniform"], strict=True)]
        co = self.table("coactivation")
        sub = co[(co["layer"] == layer) & (co["expert_i"] == expert)].sort_values("p_j_given_i", ascending=False).head(8)
        coactive = [Bar(f"E{j}", float(p), f"P = {p:.2f} (lift {lift:.2f})", self.expert_link(layer, int(j)))
                    for j, p, lift in zip(sub["expert_j"], sub["p_j_given_i"], sub["lift"], strict=True)]
        contexts, scanned = self.expert_contexts(layer, expert)
        routed_by, router_features, writes = [], [], []
        for view in self.dictionaries.values():
            if view.layer != layer:
                continue
            texts = self.descriptions(view.store)
            rows = view.rows("feature_experts", ("expert", expert), ["feature", "lift", "p_e_given_f", "count"],
                             order=(("lift", True), ("count", True), ("feature", False)), at_least=("count", 3))
            routed_by += [FeatureLink(view.key, int(r["feature"]), float(r["lift"]),
                                      f"lift {r['lift']:.1f}, P(e|f) {r['p_e_given_f']:.2f}, n={r['count']}",
                                      texts.get(int(r["feature"]))) for r in rows]
            rows = view.rows("router_attribution", ("expert", expert),
                             ["feature", "logit_per_unit", "mean_push_when_active"], order=(("mean_push_when_active", True),))
            router_features += [FeatureLink(view.key, int(r["feature"]), float(r["mean_push_when_active"]),
                                            f"+{r['mean_push_when_active']:.3f} logit when active "
                                            f"({r['logit_per_unit']:.3f} per unit)", texts.get(int(r["feature"])))
                                for r in rows]
            rows = view.rows("expert_composition", ("expert", expert), ["feature", "share"], order=(("share", True),))
            writes += [FeatureLink(view.key, int(r["feature"]), float(r["share"]), f"share {r['share']:.3f}",
                                   texts.get(int(r["feature"]))) for r in rows]
        store = self.expert_stores.get(layer)
        ablation, by_domain = None, []
        if self.study.ablation is not None:
            mine = [r for r in self.study.ablation["experts"] if r["layer"] == layer and r["expert"] == expert]
            if mine:
                ablation = mine[0]
                ctl = ablation.get("control_by_domain", {})
                by_domain = [(d, float(v), float(ctl.get(d, float("nan"))))
                             for d, v in sorted(ablation.get("ablate_by_domain", {}).items())]
        return ExpertPage(layer, expert, E, self.run.top_k[layer], loads, top_tokens, contexts, scanned, domains,
                          coactive, routed_by, router_features, writes, self.descriptions(store).get(expert),
                          self.unit_scores(store, expert), ablation, by_domain, self.explained_on(store, expert))

    def expert_contexts(self, layer: int, expert: int) -> tuple[list[Context], int]:
        """The tokens of the first shard that give the expert its largest gate weights, each in its
        window of the document, with the window's routing at `layer`; and how many tokens were scanned."""
        part = self.run.parts[0]
        experts, weights = self.run.routing_rows(part, 0, len(self.doc_column(part)), [layer])[layer]
        hit = experts == expert
        w = np.where(hit, weights, -1.0).max(1)
        n = min(CONTEXTS, int((w >= 0).sum()))
        if n == 0:
            return [], len(w)
        best = np.argpartition(-w, n - 1)[:n]
        best = best[np.argsort(-w[best], kind="stable")]
        t = self.shard_tokens(part)
        docs = self.doc_column(part)
        out = []
        for i in best.tolist():
            lo, hi = max(i - WINDOW[0], 0), min(i + WINDOW[1] + 1, len(docs))
            while docs[lo] != docs[i]:
                lo += 1
            while docs[hi - 1] != docs[i]:
                hi -= 1
            j = i - lo
            toks = joined_texts([x or "" for x in t["token"].slice(lo, hi - lo).to_pylist()], frame=j)
            strip = Strip.from_arrays(toks, {layer: (experts[lo:hi], weights[lo:hi])})
            out.append(Context(int(docs[i]), int(t["pos"][i].as_py()), t["domain"][i].as_py() or "",
                               "".join(toks[:j]), toks[j], "".join(toks[j + 1:]), float(w[i]),
                               int(np.nonzero(hit[i])[0][0]), strip, j))
        return out, len(w)

    # ---- a feature -------------------------------------------------------------------------------

    def dictionary(self, key: str) -> DictionaryView:
        key = self.dictionary_aliases.get(key, key)  # links and scripts written against the old keys still work
        if key not in self.dictionaries:
            raise DeepSeeMoEError(f"no mapped dictionary {key!r} in this study; known: {', '.join(self.dictionaries) or 'none'}")
        return self.dictionaries[key]

    def feature_page(self, key: str, feature: int) -> FeaturePage:
        view = self.dictionary(key)
        if not 0 <= feature < view.features:
            raise DeepSeeMoEError(f"feature {feature} does not exist; {view.name} has 0..{view.features - 1}")
        rows = view.rows("features", ("feature", feature), limit=None)
        stats = rows[0] if rows else {}
        layer = view.layer
        link = (lambda e: self.expert_link(layer, e)) if layer in self.run.num_experts else (lambda e: None)
        experts = [Bar(f"E{r['expert']}", float(r["p_e_given_f"]),
                       f"P(e|f) {r['p_e_given_f']:.2f}, lift {r['lift']:.1f}, n={r['count']}", link(int(r["expert"])))
                   for r in view.rows("feature_experts", ("feature", feature), ["expert", "p_e_given_f", "lift", "count"],
                                      order=(("p_e_given_f", True),))]
        attribution = [Bar(f"E{r['expert']}", float(r["logit_per_unit"]),
                           f"{r['logit_per_unit']:+.3f} logit per unit; {r['mean_push_when_active']:+.3f} when active",
                           link(int(r["expert"])))
                       for r in view.rows("router_attribution", ("feature", feature),
                                          ["expert", "logit_per_unit", "mean_push_when_active"],
                                          order=(("logit_per_unit", True),))]
        table = view.examples()
        feats = table["feature"].to_numpy()
        lo, hi = int(np.searchsorted(feats, feature, "left")), int(np.searchsorted(feats, feature, "right"))
        rows = table.slice(lo, hi - lo).to_pylist()
        top = [Example(r["activation"], r["text"], r["token"], r["experts"]) for r in rows if r["kind"] == "top"]
        quantiles: dict[int, list[Example]] = {}
        for r in rows:
            if r["kind"] == "quantile":
                quantiles.setdefault(r["quantile"], []).append(Example(r["activation"], r["text"], r["token"],
                                                                       r["experts"]))
        steering = [doc for doc in self.steering(view) if feature in doc.get("features", [])]
        return FeaturePage(view.key, feature, view.features, layer, stats, experts, attribution, top,
                           [quantiles[q] for q in sorted(quantiles)], self.descriptions(view.store).get(feature),
                           self.unit_scores(view.store, feature), steering, self.explained_on(view.store, feature))

    # ---- search ----------------------------------------------------------------------------------

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Experts and features whose description holds every word of `query`, then experts whose top
        tokens and features whose top examples' tokens equal it."""
        words = [w.lower() for w in query.split()]
        hits: list[SearchHit] = []
        if not words:
            return hits
        for layer, store in sorted(self.expert_stores.items()):
            for unit, text in sorted(self.descriptions(store).items()):
                if all(w in text.lower() for w in words):
                    hits.append(SearchHit("expert", f"layer {layer} E{unit}", self.expert_link(layer, unit), text))
        for view in self.dictionaries.values():
            for unit, text in sorted(self.descriptions(view.store).items()):
                if all(w in text.lower() for w in words):
                    hits.append(SearchHit("feature", f"{view.key} #{unit}", self.feature_link(view.key, unit), text))
        token = query.strip().lower()
        vocab = self.table("vocab_top_tokens")
        match = vocab[(vocab["token"].str.strip().str.lower() == token) & (vocab["share"] > 0)]
        for la, e, s in zip(match["layer"], match["expert"], match["share"], strict=True):
            hits.append(SearchHit("expert", f"layer {la} E{e}", self.expert_link(int(la), int(e)),
                                  f"top token {query.strip()!r} ({s:.2f} of its occurrences)"))
        import pyarrow.compute as pc

        for view in self.dictionaries.values():
            table = view.examples()
            sel = table.filter(pc.and_(pc.equal(table["kind"], "top"),
                                       pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(table["token"])), token)))
            for f in sorted(set(sel["feature"].to_pylist()))[:limit]:
                hits.append(SearchHit("feature", f"{view.key} #{f}", self.feature_link(view.key, f),
                                      f"top example on {query.strip()!r}"))
        return hits[:limit]


def _yellow(a: float) -> str:
    """White to amber by a share in [0, 1]: the shade of a token's activation."""
    a = min(max(a, 0.0), 1.0)
    return f"#ff{int(255 - a * 75):02x}{int(255 - a * 200):02x}" if a > 0 else "transparent"
