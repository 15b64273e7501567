"""MoE vs dense: the same measurements on a matched pair of models, side by side.

Units and their activity a_u(t): `interventions.units`.

Selectivity (one metric for every kind): p_u(c) ∝ mean activity of u on tokens of class c (domain,
or token class), normalised over classes; selectivity = 1 − H(p_u) / log C: 0 when the unit is
equally active on every class, 1 when it is active on one only. Units never active are left out.

Ablation selectivity: ablate one unit — an expert (weight 0), a head (its o_proj input slice 0),
or, for the dense model, a block of as many MLP neurons as one expert has (d_ff_dense / E, so
the removed capacity matches): either the block most selective for a domain (a selected unit)
or random blocks (the unselected analogue of an expert) — and compare ΔCE on the unit's
preferred domain with the mean ΔCE on the other domains (gap = preferred − others).
Everything chosen from activity — which units to ablate, each unit's preferred domain, the
selected neuron blocks — is chosen on one half of the held-out contexts and the ΔCE measured on
the other half (`split_halves`), so no row is selected on the tokens it is scored on.

The SAE frontier is trained with the regular trainer (`deepseemoe.dictionaries`) on the same
residual site of both models at equal width, for several k; FVU, dead fraction and spliced ΔCE
come from `evaluate`.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from deepseemoe.data.tokens import split_halves, token_domains
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.interventions.loss import LossMeter
from deepseemoe.interventions.routing import ablate, route_intervention
from deepseemoe.interventions.units import UnitActivity, zero_heads, zero_neurons
from deepseemoe.measures import entropy
from deepseemoe.models.handle import ModelHandle


def selectivity(mass: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """mass [U, C] summed activity per class, counts [C] tokens per class → [U] (nan if silent)."""
    mean = mass / np.maximum(counts, 1)[None, :]
    total = mean.sum(1, keepdims=True)
    h = entropy(mean, axis=1)
    C = int((counts > 0).sum())
    out = 1 - h / math.log(C) if C > 1 else np.full(len(mass), np.nan)
    return np.where(total[:, 0] > 0, out, np.nan)


def unit_selectivity(handle: ModelHandle, batches: list, class_of, n_classes: int,
                     expert_neurons: bool = True, progress: bool = False, description: str = "selectivity") -> dict:
    """Per unit kind: selectivity of every unit (all layers), and the per-class token counts."""
    device = next(handle.model.parameters()).device
    acts = UnitActivity(handle, n_classes, expert_neurons)
    counts = np.zeros(n_classes)
    from deepseemoe.progress import track

    for b in track(batches, description, disable=not progress, unit="batches"):
        ids, am = b.input_ids.to(device), b.attention_mask.to(device)
        keep = b.keep.to(device)
        classes = class_of(b)[keep.cpu()].to(device)
        counts += np.bincount(classes.cpu().numpy(), minlength=n_classes)
        acts.run(ids, am, keep, classes)
    out = {}
    for kind, by_layer in acts.mass.items():
        per_layer = {layer: selectivity(m, counts) for layer, m in by_layer.items()}
        out[kind] = {"per_layer": per_layer, "mass": by_layer}
    return {"units": out, "counts": counts}


def summarize_selectivity(sel: dict) -> dict:
    rows = {}
    for kind, d in sel["units"].items():
        v = np.concatenate([x for x in d["per_layer"].values()])
        v = v[~np.isnan(v)]
        if len(v):
            rows[kind] = {"units": len(v), "mean": float(v.mean()), "median": float(np.median(v)),
                          "p90": float(np.quantile(v, 0.9)), "share_above_0.5": float((v > 0.5).mean())}
    return rows


def _preferred(mass_row: np.ndarray, counts: np.ndarray) -> int:
    return int(np.argmax(mass_row / np.maximum(counts, 1)))


def _gap(res: dict, preferred: str) -> dict:
    by = res["by_domain"]
    others = [v for d, v in by.items() if d != preferred]
    mean_others = float(np.mean(others)) if others else float("nan")
    return {"preferred": preferred, "delta_ce_preferred": by.get(preferred, float("nan")),
            "delta_ce_others": mean_others, "gap": by.get(preferred, float("nan")) - mean_others}


def ablation_selectivity(handle: ModelHandle, batches: list, domains: list[str], sel: dict,
                         max_units_per_kind: int = 64, progress: bool = False, description: str = "ablations"
                         ) -> dict:
    """Ablate experts / heads / domain neuron blocks one at a time; ΔCE on the preferred domain vs
    the others (units chosen as the most active ones when there are more than `max_units_per_kind`).
    `sel` (what picks units, blocks and preferred domains) must come from other tokens than
    `batches` (where ΔCE is measured): see `split_halves`."""
    meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    counts = sel["counts"]
    out: dict[str, list[dict]] = defaultdict(list)
    units = sel["units"]

    def most_active(mass_by_layer: dict) -> list[tuple[int, int]]:
        cand = [(float(m[u].sum()), layer, u) for layer, m in mass_by_layer.items() for u in range(len(m))]
        cand.sort(reverse=True)
        return [(la, u) for _, la, u in cand[:max_units_per_kind]]

    from deepseemoe.progress import progress_bar

    total = sum(len(most_active(units[k]["mass"])) for k in ("expert", "attention_head") if k in units)
    if "mlp_neuron" in units:
        total += len(units["mlp_neuron"]["mass"]) * (int((counts > 0).sum()) + min(4, sel.get("experts_to_match", 16)))
    bar = progress_bar(disable=not progress, unit="ablations")
    task = bar.add_task(description, total=total)

    def measure(context) -> dict:
        res = meter.measure(context)
        bar.advance(task)
        return res

    with bar:
        _ablate_units(handle, units, domains, counts, sel, most_active, measure, out)
    return dict(out)


def _ablate_units(handle, units, domains, counts, sel, most_active, measure, out) -> None:
    if "expert" in units:
        for layer, e in most_active(units["expert"]["mass"]):
            pref = domains[_preferred(units["expert"]["mass"][layer][e], counts)]
            res = measure(lambda layer=layer, e=e: route_intervention(handle, {layer: ablate([e])}))
            out["expert"].append({"layer": layer, "unit": e, **_gap(res, pref)})
    if "attention_head" in units:
        for layer, hd in most_active(units["attention_head"]["mass"]):
            pref = domains[_preferred(units["attention_head"]["mass"][layer][hd], counts)]
            proj, heads = handle.attention_output(layer)
            res = measure(lambda proj=proj, hd=hd, heads=heads: zero_heads(proj, [hd], heads))
            out["attention_head"].append({"layer": layer, "unit": hd, **_gap(res, pref)})
    if "mlp_neuron" in units:
        for layer, mass in units["mlp_neuron"]["mass"].items():
            block = max(1, mass.shape[0] // sel.get("experts_to_match", 16))
            mean = mass / np.maximum(counts, 1)[None, :]
            p = mean / np.maximum(mean.sum(1, keepdims=True), 1e-30)
            for c, dom in enumerate(domains):
                if counts[c] == 0:
                    continue
                chosen = np.argsort(-(p[:, c] * mean[:, c]))[:block]
                module = handle.model.get_submodule(handle.dense_mlps[layer].neuron_path)
                res = measure(lambda module=module, chosen=chosen: zero_neurons(module, chosen))
                out["mlp_neuron_block"].append({"layer": layer, "unit": dom, "neurons": int(block), **_gap(res, dom)})
            # the unselected analogue of an expert: a random block of the same size, its preferred
            # domain read off its activity like an expert's (no selection on the evaluation data)
            g = np.random.default_rng(layer)
            for r in range(min(4, sel.get("experts_to_match", 16))):
                chosen = g.choice(mass.shape[0], size=block, replace=False)
                pref = domains[_preferred(mass[chosen].sum(0), counts)]
                module = handle.model.get_submodule(handle.dense_mlps[layer].neuron_path)
                res = measure(lambda module=module, chosen=chosen: zero_neurons(module, chosen))
                out["mlp_random_block"].append({"layer": layer, "unit": r, "neurons": int(block), **_gap(res, pref)})


def domain_classes(batches: list) -> tuple[list[str], callable]:
    names = sorted({d or "all" for b in batches for d in b.domains.values()})
    index = {n: i for i, n in enumerate(names)}

    def class_of(b) -> torch.Tensor:
        doc = b.doc.reshape(-1)
        lab = [index[b.domains.get(int(d)) or "all"] if d >= 0 else 0 for d in doc.tolist()]
        return torch.tensor(lab)
    return names, class_of


def token_classes(tokenizer) -> tuple[list[str], callable]:
    from deepseemoe.routing.stats import TOKEN_CLASSES, token_class

    cache: dict[int, int] = {}

    def class_of(b) -> torch.Tensor:
        ids = b.input_ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if i not in cache:
                cache[i] = token_class(tokenizer.convert_ids_to_tokens(i))
            out.append(cache[i])
        return torch.tensor(out)
    return list(TOKEN_CLASSES), class_of


def _merge_selectivity(a: dict, b: dict) -> dict:
    """Selectivity over both halves: the per-class sums and counts add up."""
    counts = a["counts"] + b["counts"]
    units = {}
    for kind in a["units"]:
        mass = {layer: m + b["units"][kind]["mass"][layer] for layer, m in a["units"][kind]["mass"].items()}
        units[kind] = {"mass": mass, "per_layer": {la: selectivity(m, counts) for la, m in mass.items()}}
    return {"units": units, "counts": counts}


def compare_models(moe: ModelHandle, dense: ModelHandle, batches_moe: list, batches_dense: list, *,
                   separate: ModelHandle | None = None, batches_separate: list | None = None,
                   expert_neurons: bool = True, max_units_per_kind: int = 64, progress: bool = False) -> dict:
    """Selectivity by domain and by token class, and ablation selectivity, for both models (and a
    third, `separate`: an MoE whose experts were trained separately); for each MoE also its routing
    by domain and the removal of each domain's experts (`routing_compare`)."""
    if not moe.is_moe:
        raise DeepSeeMoEError(f"{moe.name} has no MoE layers; pass the MoE model first")
    if separate is not None and not separate.is_moe:
        raise DeepSeeMoEError(f"{separate.name} has no MoE layers; the separately trained model must be an MoE")
    sides = [("moe", moe, batches_moe), ("dense", dense, batches_dense)]
    # the share of a model's experts that one domain's experts are: one expert of the separate model
    removed = 1 / max(m.num_experts for m in separate.moe_layers.values()) if separate is not None else None
    if separate is not None:
        sides.append(("separate", separate, batches_separate))
    result = {}
    for label, h, batches in sides:
        domains, by_domain = domain_classes(batches)
        select, evaluate = split_halves(batches)
        shown = {"progress": progress}
        sel = unit_selectivity(h, select, by_domain, len(domains), expert_neurons, **shown,
                               description=f"{label}: selectivity (selection half)")
        held = unit_selectivity(h, evaluate, by_domain, len(domains), expert_neurons, **shown,
                                description=f"{label}: selectivity (evaluation half)")
        tnames, by_token = token_classes(h.tokenizer)
        sel_tok = unit_selectivity(h, batches, by_token, len(tnames), expert_neurons=False, **shown,
                                   description=f"{label}: token-class selectivity")
        sel["experts_to_match"] = max((m.num_experts for m in moe.moe_layers.values()), default=16)
        result[label] = {"domains": domains, "domain_selectivity": summarize_selectivity(_merge_selectivity(sel, held)),
                         "token_class_selectivity": summarize_selectivity(sel_tok),
                         "ablation": ablation_selectivity(h, evaluate, domains, sel, max_units_per_kind, **shown,
                                                          description=f"{label}: ablations"),
                         "ablation_split": {"select_tokens": int(sum(b.keep.sum() for b in select)),
                                            "evaluate_tokens": int(sum(b.keep.sum() for b in evaluate))}}
        if h.is_moe:
            result[label].update(_routing_by_domain(h, select, evaluate, domains, by_domain, removed))
    return result


def _routing_by_domain(h: ModelHandle, select: list, evaluate: list, domains: list[str], by_domain,
                       removed: float | None) -> dict:
    from deepseemoe.compare.domains import (
        domain_removal,
        own_experts,
        removal_size,
        routing_counts,
        routing_summary,
    )
    from deepseemoe.models.handle import declared_expert_names

    declared = declared_expert_names(h.model.config)
    experts = max(m.num_experts for m in h.moe_layers.values())
    share = removed or 1 / (1 + len([d for d in domains if d != "all"]))
    own = own_experts(routing_counts(h, select, by_domain, len(domains)), removal_size(experts, share))
    return {"routing": routing_summary(routing_counts(h, evaluate, by_domain, len(domains)), own, domains, declared),
            "domain_removal": domain_removal(h, evaluate, domains, own, declared=declared),
            "expert_names": declared}
