"""Are a model's experts specialists? Domain specialisation of routing runs, each against a null.

For each routing run (e.g. a trained MoE, an MoE carved from a dense model by co-activation
clusters, the same carve with a random split of the neurons) and each MoE layer, from the
top-1 expert of every token (the router's first choice; the comparison holds across top-k):
  nmi             NMI(domain; top-1 expert), `routing.stats.mutual_information`
  specialists     experts whose top-1 tokens over-represent one domain: lift = P(d | e) / P(d)
                  ≥ `min_lift`, on ≥ `min_tokens` of that domain's tokens
  best share      per domain, the share of its tokens whose top-1 is its most used expert
The null keeps every document's routing and length and the number of documents per domain,
and permutes the domain labels across documents (`shuffles` times): what the same routing
would show if domains were unrelated to it. A model's specialisation is its value against
this null (mean, 95th percentile); two models are compared by their excess over their nulls.

Tokens: those the routing run kept (its capture drops BOS by default), documents up to
`max_docs` in run order (the per-document counts [docs, E] per layer are held in memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.routing.stats import mutual_information
from deepseemoe.runs.routing import RoutingRun

MIN_LIFT = 2.0
MIN_TOKENS = 20


@dataclass
class ExpertProfile:
    expert: int
    top1_share: float  # share of all kept tokens whose top-1 is this expert
    domain: str  # the domain it over-represents most (among those with ≥ min_tokens of its tokens)
    lift: float  # P(domain | expert) / P(domain)
    domain_tokens: int  # that domain's tokens with this expert as top-1
    specialist: bool
    top_tokens: list[tuple[str, float]] = field(default_factory=list)  # the routing stats' vocab_top_tokens


@dataclass
class LayerSpecialists:
    layer: int
    experts: int
    nmi: float
    nmi_null_mean: float
    nmi_null_p95: float
    specialists: int
    specialists_null_mean: float
    best_share: dict[str, dict]  # domain -> {"expert", "share", "null_mean"}
    profiles: list[ExpertProfile]


@dataclass
class ModelSpecialists:
    label: str
    run: str
    tokens: int
    documents: int
    top_k: int
    layers: dict[int, LayerSpecialists]

    def mean(self, name: str) -> float:
        return float(np.mean([getattr(s, name) for s in self.layers.values()]))


@dataclass
class Specialists:
    models: dict[str, ModelSpecialists]
    settings: dict

    def to_json(self) -> dict:
        return {"definitions": __doc__.split("\n\n")[1], "settings": self.settings,
                "models": {label: {**{k: v for k, v in asdict(m).items() if k != "layers"},
                                   "layers": {str(layer): asdict(s) for layer, s in m.layers.items()},
                                   "mean": {n: m.mean(n) for n in ("nmi", "nmi_null_mean", "nmi_null_p95",
                                                                     "specialists", "specialists_null_mean")}}
                           for label, m in self.models.items()}}


def _doc_counts(run: RoutingRun, max_docs: int) -> tuple[dict[int, np.ndarray], list[str | None]]:
    """Per layer, [documents, E] counts of top-1 choices, and each document's domain."""
    rows: dict[int, int] = {}
    domains: list[str | None] = []
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in run.layers}
    for part in run.parts:
        t = run.read_table("tokens", part, ["doc", "domain"])
        doc = t["doc"].to_numpy()
        uniq, first, inverse = np.unique(doc, return_index=True, return_inverse=True)
        first_domain = t["domain"].take(first).to_pylist()
        row_of = np.full(len(uniq), -1, np.int64)
        for j in np.argsort(first):  # this shard's documents in run order
            r = rows.get(int(uniq[j]))
            if r is None and len(rows) < max_docs:
                r = rows[int(uniq[j])] = len(rows)
                domains.append(first_domain[j])
            if r is not None:
                row_of[j] = r
        idx = row_of[inverse]
        keep = idx >= 0
        layers = run.routing_layers(part, len(doc), columns=("expert",))
        for layer, (experts,) in layers.items():
            E = run.num_experts[layer]
            flat = idx[keep] * E + experts[keep, 0].astype(np.int64)
            per_layer[layer].append(np.bincount(flat, minlength=len(rows) * E))
    out = {}
    for layer, chunks in per_layer.items():
        E = run.num_experts[layer]
        total = np.zeros(len(rows) * E, np.int64)
        for c in chunks:
            total[: len(c)] += c
        out[layer] = total.reshape(len(rows), E)
    return out, domains


def _joint(docs: np.ndarray, domain_of_doc: np.ndarray, D: int) -> np.ndarray:
    """[D, E] counts: each document's [E] counts added to its domain's row."""
    table = np.zeros((D, docs.shape[1]), np.int64)
    np.add.at(table, domain_of_doc, docs)
    return table


def _measures(joint: np.ndarray, min_lift: float, min_tokens: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(NMI, lift [D, E], specialist mask [E], best share per domain [D]) of a [D, E] count table."""
    total = joint.sum()
    p_d = joint.sum(1, keepdims=True) / max(total, 1)
    p_d_given_e = joint / np.clip(joint.sum(0, keepdims=True), 1, None)
    lift = np.where(p_d > 0, p_d_given_e / np.clip(p_d, 1e-300, None), 0.0)
    eligible = joint >= min_tokens
    specialist = ((lift >= min_lift) & eligible).any(0)
    best_share = joint.max(1) / np.clip(joint.sum(1), 1, None)
    return mutual_information(joint)[1], lift, specialist, best_share


def model_specialists(run_dir: str | Path, label: str, *, shuffles: int = 50, seed: int = 0, min_lift: float = MIN_LIFT,
                      min_tokens: int = MIN_TOKENS, max_docs: int = 20_000, top_tokens: int = 6) -> ModelSpecialists:
    """One routing run's domain specialisation per MoE layer, against the domain-permutation null.
    The run's routing statistics (`deepseemoe stats`) give each expert's top tokens."""
    run = RoutingRun.open(run_dir)
    counts, doc_domains = _doc_counts(run, max_docs)
    names = sorted({d for d in doc_domains if d is not None})
    if len(names) < 2:
        raise DeepSeeMoEError(f"{run.run_dir}: specialisation needs text of at least two domains (found "
                              f"{len(names)}); route a corpus whose documents carry a domain (--domain-field)")
    code = np.array([names.index(d) if d is not None else -1 for d in doc_domains])
    labelled = code >= 0
    try:
        vocab = run.analyses().table("vocab_top_tokens")
    except DeepSeeMoEError:
        raise DeepSeeMoEError(f"{run.run_dir} has no routing statistics; run `deepseemoe stats {run.run_dir}` "
                              "first") from None
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(code[labelled]) for _ in range(shuffles)]
    D = len(names)
    layers = {}
    for layer, per_doc in counts.items():
        docs = per_doc[labelled]
        E = docs.shape[1]
        table = _joint(docs, code[labelled], D)
        nmi, lift, specialist, best = _measures(table, min_lift, min_tokens)
        null = [_measures(_joint(docs, p, D), min_lift, min_tokens) for p in perms]
        null_nmi = np.array([n[0] for n in null])
        null_best = np.stack([n[3] for n in null]) if null else np.zeros((0, D))
        top1 = table.sum(0) / max(table.sum(), 1)
        profiles = []
        for e in range(E):
            ok = table[:, e] >= min_tokens
            d = int(np.argmax(np.where(ok, lift[:, e], -1.0))) if ok.any() else int(np.argmax(table[:, e]))
            sub = vocab[(vocab["layer"] == layer) & (vocab["expert"] == e)].sort_values("rank").head(top_tokens)
            profiles.append(ExpertProfile(e, float(top1[e]), names[d], float(lift[d, e]), int(table[d, e]),
                                          bool(specialist[e]),
                                          [(str(t), float(s)) for t, s in zip(sub["token"], sub["share"], strict=True)]))
        layers[layer] = LayerSpecialists(
            layer, E, float(nmi), float(null_nmi.mean()) if null else float("nan"),
            float(np.quantile(null_nmi, 0.95)) if null else float("nan"), int(specialist.sum()),
            float(np.mean([n[2].sum() for n in null])) if null else float("nan"),
            {names[d]: {"expert": int(np.argmax(table[d])), "share": float(best[d]),
                        "null_mean": float(null_best[:, d].mean()) if null else float("nan")} for d in range(D)},
            profiles)
    tokens = int(sum(c.sum() for c in counts.values()) // max(len(counts), 1))
    return ModelSpecialists(label, str(run.run_dir), tokens, len(doc_domains), max(run.top_k.values()), layers)


def expert_specialists(runs: dict[str, str | Path], *, shuffles: int = 50, seed: int = 0, min_lift: float = MIN_LIFT,
                       min_tokens: int = MIN_TOKENS, max_docs: int = 20_000) -> Specialists:
    """`model_specialists` of each labelled routing run, with the same null and thresholds."""
    if not runs:
        raise DeepSeeMoEError("no routing runs to compare; give at least one")
    settings = {"shuffles": shuffles, "seed": seed, "min_lift": min_lift, "min_tokens": min_tokens,
                "max_docs": max_docs}
    return Specialists({label: model_specialists(path, label, shuffles=shuffles, seed=seed, min_lift=min_lift,
                                                 min_tokens=min_tokens, max_docs=max_docs)
                        for label, path in runs.items()}, settings)


def specialists_markdown(result: dict) -> str:
    """The table of `Specialists.to_json()`: one row per model, means over its MoE layers."""
    lines = ["| model | layers | top-k | NMI(domain; top-1) | null mean | null p95 | specialists | null |",
             "|---|---|---|---|---|---|---|---|"]
    for label, m in result["models"].items():
        mean, n = m["mean"], len(m["layers"])
        experts = next(iter(m["layers"].values()))["experts"]
        lines.append(f"| {label} | {n} | {m['top_k']} of {experts} | {mean['nmi']:.3f} | {mean['nmi_null_mean']:.3f} | "
                     f"{mean['nmi_null_p95']:.3f} | {mean['specialists']:.1f} | {mean['specialists_null_mean']:.1f} |")
    return "\n".join(lines) + "\n"
