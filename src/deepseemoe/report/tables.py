"""Results as the rows every reader shows — the HTML report, the explorer and the verbs' terminal
tables (`report.terminal`): the model comparison (MoE vs dense, and experts trained separately, also as
markdown), a behaviour's removal (`ablate --target`) and the causal checks' layers (`ablate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


SIDES = {"moe": "MoE (trained together)", "separate": "MoE (experts trained separately)", "dense": "dense"}


@dataclass
class ComparisonTable:
    """The comparison as rows of formatted values, one column per model (`SIDES` order)."""

    sides: list[str]
    rows: list[tuple[str, list[str]]]
    folder: str = ""  # where the comparison was read from, relative to the study (the report names it)

    @property
    def columns(self) -> list[str]:
        if "separate" not in self.sides:
            return ["MoE" if s == "moe" else SIDES[s] for s in self.sides]
        return [SIDES[s] for s in self.sides]


def comparison_table(result: dict, folder: str = "") -> ComparisonTable:
    sides = [s for s in SIDES if s in result and isinstance(result[s], dict) and "domains" in result[s]]
    rows: list[tuple[str, list[str]]] = []
    kinds = ["expert", "expert_neuron", "mlp_neuron", "attention_head"]
    for what, key in (("domain", "domain_selectivity"), ("token-class", "token_class_selectivity")):
        for kind in kinds:
            vals = [result[s][key].get(kind) for s in sides]
            if any(vals):
                rows.append((f"{what} selectivity of {kind.replace('_', ' ')}s (median; share > 0.5)",
                             [f"{_fmt(v['median'])}; {_fmt(v['share_above_0.5'])}" if v else "—" for v in vals]))
    split = result["moe"].get("ablation_split")
    chosen = " (units and preferred domains chosen on one half of the held-out text, scored on the other)" \
        if split else ""
    labels = {"expert": "experts", "mlp_random_block": "random MLP neuron blocks of one expert's size (unselected)",
              "mlp_neuron_block": "most domain-selective MLP neuron blocks of one expert's size (selected)",
              "attention_head": "attention heads"}
    for kind in ("expert", "mlp_random_block", "mlp_neuron_block", "attention_head"):
        vals = []
        for side in sides:
            gaps = [u["gap"] for u in result[side]["ablation"].get(kind, []) if u["gap"] == u["gap"]]
            vals.append(f"{np.mean(gaps):.4f} (n={len(gaps)})" if gaps else "—")
        if any(v != "—" for v in vals):
            rows.append((f"ablation ΔCE gap, preferred − other domains: {labels[kind]}{chosen}", vals))
    rows += _routing_rows(result, sides)
    val = result.get("val_loss")
    if val:
        for d in sorted(val.get("moe", {})):
            rows.append((f"validation loss, {d} (nats/token; unigram {_fmt(val.get('unigram', {}).get(d))})",
                         [_fmt(val.get(s, {}).get(d)) for s in sides]))
    rows += _block_feature_rows(result, sides)
    desc = result.get("descriptions")
    if desc:
        rows.append((f"expert descriptions (layer {desc['layer']}) that name the expert's domain (separately: the "
                     "domain it was trained on; together: the domain it takes the largest share of)",
                     [f"{desc[s]['named']} of {desc[s]['experts']}" if s in desc else "—" for s in sides]))
    fr = result.get("sae_frontier")
    if fr:
        for i, row in enumerate(fr["rows"]["moe"]):
            for m in ("fvu", "dead", "delta_ce", "loss_recovered"):
                rows.append((f"SAE k={row['k']} (layer {fr['layer']}, ×{fr['expansion_factor']}): {m}",
                             [_fmt(fr["rows"][s][i][m]) if s in fr["rows"] else "—" for s in sides]))
    return ComparisonTable(sides, rows, folder)


def _block_feature_rows(result: dict, sides: list[str]) -> list[tuple[str, list[str]]]:
    """The MoEs' block-input SAEs and their feature ↔ expert maps (`sae_frontier.block_sae_maps`)."""
    bf = result.get("block_features")
    if not bf:
        return []
    head = f"block-input SAE (layer {bf['layer']}, ×{bf['expansion_factor']}, k={bf['k']})"

    def cell(side: str, key: str, sub: str | None = None):
        row = bf["rows"].get(side)
        v = None if row is None else row.get(key)
        return _fmt(v.get(sub) if isinstance(v, dict) and sub else v)

    rows = []
    for label, key, sub in (("FVU", "fvu", None), ("dead latents", "dead", None), ("ΔCE spliced in", "delta_ce", None),
                            ("feature ↔ expert specificity (median over live features)", "specificity_median", None),
                            ("share of live features specific to experts (> 0.5)", "expert_specific_share", None),
                            ("a feature's strongest expert lift (median)", "top_lift_median", None),
                            ("a feature's strongest expert MI, bits (median)", "top_mi_bits_median", None),
                            ("routing recall@k from features", "routing_prediction", "features"),
                            ("routing recall@k from token identity", "routing_prediction", "token"),
                            ("routing recall@k from bigrams", "routing_prediction", "bigram")):
        rows.append((f"{head}: {label}", [cell(s, key, sub) for s in sides]))
    return rows


def _routing_rows(result: dict, sides: list[str]) -> list[tuple[str, list[str]]]:
    """Routing by domain and domain removal (`routing_compare`), for the MoE columns."""
    if not any("routing" in result[s] for s in sides):
        return []

    def get(side: str, *path):
        v = result[side]
        for key in path:
            if not isinstance(v, dict) or key not in v:
                return None
            v = v[key]
        return v

    m = {s: get(s, "domain_removal", "experts_removed_per_layer") for s in sides}
    short = {"moe": "together", "separate": "separately"}
    own = "its m experts with the most of its tokens, chosen on the selection half; m = " + ", ".join(
        f"{m[s]} ({short[s]})" for s in sides if m[s])
    rows = []
    for label, path in (("NMI(domain; expert), all top-k slots (mean over layers)", ("routing", "mean", "nmi_all_slots")),
                        ("NMI(domain; expert), first slot", ("routing", "mean", "nmi_top1")),
                        (f"share of a domain's tokens routed to its own experts ({own})",
                         ("routing", "mean", "own_share_mean")),
                        ("share of a domain's tokens routed to the expert trained on it (declared)",
                         ("routing", "mean", "declared_share_mean")),
                        ("load entropy (normalised; 1 = even)", ("routing", "mean", "load_entropy")),
                        ("largest expert load (share of slots)", ("routing", "mean", "max_load")),
                        ("co-activation: share of tokens on the most common top-k set",
                         ("routing", "mean", "top_set_share"))):
        vals = [_fmt(get(s, *path)) for s in sides]
        if any(v != "—" for v in vals):
            rows.append((label, vals))
    for kind, what in (("own", "its own experts"), ("declared", "the expert trained on it"),
                       ("random", "as many random experts (3 draws)")):
        for part, text in (("target", "ΔCE on the domain"), ("others", "mean ΔCE on the other domains")):
            vals = [_fmt(get(s, "domain_removal", "summary", kind, part)) for s in sides]
            if any(v != "—" for v in vals):
                rows.append((f"removing a domain's experts — {what}, every layer: {text}", vals))
    return rows


def comparison_markdown(result: dict) -> str:
    table = comparison_table(result)
    lines = ["| measure | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    lines += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in table.rows]
    return "\n".join(lines) + "\n"


@dataclass
class RemovalRow:
    model: str
    kind: str  # "expert", "expert neuron", "mlp neuron", "attention head"
    units: int
    of: int
    params: float
    selected: dict  # target, off_target, gap, ratio, kl
    random: dict | None
    experts: list[tuple[int, int]]  # (layer, expert) of the selected experts (kind "expert" only)


@dataclass
class RemovalTable:
    """removal.json as the report and the explorer show it."""

    target: str
    share: float | None
    draws: int
    predictions: dict[str, dict]  # model -> {"target": n, "off_target": n} scored
    rows: list[RemovalRow]
    layers: list[int] | None = None  # the units came from these layers only (None: every layer)


def removal_table(result: dict) -> RemovalTable:
    rows = [RemovalRow(model=label, kind=kind.replace("_", " "), units=k["units"], of=k["of"],
                       params=k["params_removed"], selected=k["selected"], random=k["random"],
                       experts=[(c["layer"], c["unit"]) for c in k["chosen"]] if kind == "expert" else [])
            for label, m in result["models"].items() for kind, k in m["kinds"].items()]
    return RemovalTable(target=result["target"]["label"], share=result["budget"]["share"], draws=result["draws"],
                        predictions={label: m["evaluate_predictions"] for label, m in result["models"].items()},
                        rows=rows, layers=result.get("layers"))


@dataclass
class CausalLayerRow:
    """One MoE layer of the causal checks (ΔCE, nats/token): random routing and top-1-only routing in
    that layer, the mean over its experts of ablation and of its load-matched control, the most
    damaging expert with its control, and ρ (Spearman, across experts) of load and of output norm with
    the ablation ΔCE. Expert figures are None when no expert of the layer was ablated."""

    layer: int
    random: float
    top1: float
    mean_ablate: float | None
    mean_control: float | None
    worst: float | None
    worst_expert: int | None
    control: float | None
    rho_load: float | None
    rho_norm: float | None


def causal_rows(result: dict) -> list[CausalLayerRow]:
    corr = {r["layer"]: r for r in result["observational_vs_causal"]}
    rows = []
    for r in result["layers"]:
        mine = [e for e in result["experts"] if e["layer"] == r["layer"]]
        worst = max(mine, key=lambda e: e["ablate_delta_ce"]) if mine else None
        rows.append(CausalLayerRow(
            layer=r["layer"], random=r["random_routing_delta_ce"], top1=r["top1_only_delta_ce"],
            mean_ablate=float(np.mean([e["ablate_delta_ce"] for e in mine])) if mine else None,
            mean_control=float(np.mean([e["control_delta_ce"] for e in mine])) if mine else None,
            worst=worst["ablate_delta_ce"] if worst else None, worst_expert=worst["expert"] if worst else None,
            control=worst["control_delta_ce"] if worst else None,
            rho_load=corr.get(r["layer"], {}).get("spearman_load"),
            rho_norm=corr.get(r["layer"], {}).get("spearman_output_norm")))
    return rows
