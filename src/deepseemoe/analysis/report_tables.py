"""The MoE-vs-dense comparison as one markdown table (also embedded in the HTML report)."""

from __future__ import annotations

import numpy as np


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def comparison_rows(result: dict) -> list[tuple[str, str, str]]:
    """(measure, MoE, dense) rows."""
    rows = []
    kinds = ["expert", "expert_neuron", "mlp_neuron", "attention_head"]
    for what, key in (("domain", "domain_selectivity"), ("token-class", "token_class_selectivity")):
        for kind in kinds:
            m, d = result["moe"][key].get(kind), result["dense"][key].get(kind)
            if m or d:
                rows.append((f"{what} selectivity of {kind.replace('_', ' ')}s (median; share > 0.5)",
                             f"{_fmt(m['median'])}; {_fmt(m['share_above_0.5'])}" if m else "—",
                             f"{_fmt(d['median'])}; {_fmt(d['share_above_0.5'])}" if d else "—"))
    split = result["moe"].get("ablation_split")
    chosen = " (units and preferred domains chosen on one half of the held-out text, scored on the other)" \
        if split else ""
    labels = {"expert": "experts", "mlp_random_block": "random MLP neuron blocks of one expert's size (unselected)",
              "mlp_neuron_block": "most domain-selective MLP neuron blocks of one expert's size (selected)",
              "attention_head": "attention heads"}
    for kind in ("expert", "mlp_random_block", "mlp_neuron_block", "attention_head"):
        vals = {}
        for side in ("moe", "dense"):
            units = result[side]["ablation"].get(kind, [])
            gaps = [u["gap"] for u in units if u["gap"] == u["gap"]]
            vals[side] = (f"{np.mean(gaps):.4f} (n={len(gaps)})" if gaps else "—")
        if vals["moe"] != "—" or vals["dense"] != "—":
            rows.append((f"ablation ΔCE gap, preferred − other domains: {labels[kind]}{chosen}",
                         vals["moe"], vals["dense"]))
    fr = result.get("sae_frontier")
    if fr:
        for i, row in enumerate(fr["rows"]["moe"]):
            d = fr["rows"]["dense"][i]
            for m in ("fvu", "dead", "delta_ce", "loss_recovered"):
                rows.append((f"SAE k={row['k']} (layer {fr['layer']}, ×{fr['expansion_factor']}): {m}",
                             _fmt(row[m]), _fmt(d[m])))
    return rows


def comparison_markdown(result: dict) -> str:
    lines = ["| measure | MoE | dense |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in comparison_rows(result)]
    return "\n".join(lines) + "\n"
