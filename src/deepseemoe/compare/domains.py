"""Routing side by side for MoEs trained differently (jointly vs separately), and removing a domain.

Per layer, on held-out tokens with a domain label (BOS and padding excluded):
- counts[c, e]   top-k slots of class c's tokens that went to expert e; top1[c, e] the first slot;
- NMI(domain; expert) over all slots and over the first slot (`measures.mutual_information`);
- a domain's own expert(s): the m experts with the largest share of its tokens, chosen on the
  selection half of the contexts (for a model whose config names each expert's training domain,
  also the declared one); own share: the fraction of the domain's tokens (evaluation half) that
  have one of them in their top-k;
- load: the normalised entropy of the slot load and the largest load; co-activation: the share of
  tokens on the most common top-k set.

Removing a domain (FlexOlmo's opt-out, tested): exclude the domain's own m experts in every layer
(the router re-selects the top-k without them, as if they were absent) and measure ΔCE on that
domain against the mean ΔCE on the others; beside it, m random experts per layer (3 draws).
m = round(E · s): s is the share of its experts one domain expert of the separately trained model
is (1 of its experts; without one, 1 of 1 + C for C domains, the FlexOlmo layout), so both kinds
of MoE lose the same share of their experts.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from deepseemoe.data.tokens import token_domains
from deepseemoe.interventions.loss import LossMeter
from deepseemoe.interventions.routing import exclude, route_intervention
from deepseemoe.measures import mutual_information, normalised_entropy
from deepseemoe.models.handle import ModelHandle


def routing_counts(handle: ModelHandle, batches: list, class_of, n_classes: int) -> dict[int, dict]:
    """Per MoE layer: 'slots' [C, E] top-k counts, 'top1' [C, E], 'sets' [C] of {sorted top-k tuple: count}."""
    device = next(handle.model.parameters()).device
    out = {layer: {"slots": np.zeros((n_classes, m.num_experts), np.int64),
                   "top1": np.zeros((n_classes, m.num_experts), np.int64),
                   "sets": [defaultdict(int) for _ in range(n_classes)]}
           for layer, m in handle.moe_layers.items()}
    for b in batches:
        keep = b.keep.reshape(-1)
        classes = class_of(b)[keep].numpy()
        hooks = []
        for layer, moe in handle.moe_layers.items():
            def cb(ev, layer=layer, keep=keep, classes=classes):
                idx = ev.idx.reshape(-1, ev.idx.shape[-1])[keep.to(ev.idx.device)].cpu().numpy()
                c = out[layer]
                np.add.at(c["slots"], (np.repeat(classes, idx.shape[1]), idx.ravel()), 1)
                np.add.at(c["top1"], (classes, idx[:, 0]), 1)
                for cls, row in zip(classes.tolist(), np.sort(idx, 1).tolist(), strict=True):
                    c["sets"][cls][tuple(row)] += 1
            hooks += moe.adapter.observe(moe, cb)
        try:
            with torch.no_grad():
                handle.model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                             use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    return out


def own_experts(select: dict[int, dict], m: int) -> dict[int, np.ndarray]:
    """Per layer, per class: its m experts with the largest share of its tokens [C, m]."""
    return {layer: np.argsort(-c["slots"], axis=1, kind="stable")[:, :m] for layer, c in select.items()}


def routing_summary(evaluate: dict[int, dict], own: dict[int, np.ndarray], domains: list[str],
                    declared: list[str] | None = None) -> dict:
    """Means over layers of the measures in the module docstring (per-layer values kept)."""
    per_layer = {}
    for layer, c in evaluate.items():
        slots, top1 = c["slots"], c["top1"]
        tokens = top1.sum(1)
        k = slots.sum() / max(tokens.sum(), 1)
        active = tokens > 0
        share = {}
        for ci, d in enumerate(domains):
            if active[ci]:  # tokens with at least one of the domain's own experts in their top-k
                mine = set(own[layer][ci].tolist())
                share[d] = sum(n for s, n in c["sets"][ci].items() if mine & set(s)) / float(tokens[ci])
        load = slots.sum(0) / max(slots.sum(), 1)
        ent = float(normalised_entropy(load))
        row = {"nmi_all_slots": mutual_information(slots[active])[1], "nmi_top1": mutual_information(top1[active])[1],
               "own_share": share, "own_share_mean": float(np.mean(list(share.values()))) if share else None,
               "load_entropy": ent, "max_load": float(load.max()), "top_k": float(k),
               "top_set_share": _top_set_share(c["sets"], int(tokens.sum()))}
        if declared:
            index = {name: i for i, name in enumerate(declared)}
            dec = {d: float(slots[ci, index[d]] / tokens[ci]) for ci, d in enumerate(domains)
                   if active[ci] and d in index}
            row["declared_share"] = dec
            row["declared_share_mean"] = float(np.mean(list(dec.values()))) if dec else None
            row["own_is_declared"] = float(np.mean([index.get(d) in own[layer][ci] for ci, d in enumerate(domains)
                                                    if active[ci] and d in index])) if dec else None
        per_layer[layer] = row
    keys = ["nmi_all_slots", "nmi_top1", "own_share_mean", "load_entropy", "max_load", "top_set_share",
            "declared_share_mean", "own_is_declared"]
    mean = {key: float(np.mean(v)) for key in keys
            if (v := [r[key] for r in per_layer.values() if r.get(key) is not None])}
    return {"mean": mean, "per_layer": per_layer}


def _top_set_share(sets: list[dict], tokens: int) -> float | None:
    pooled: dict[tuple, int] = defaultdict(int)
    for per_class in sets:
        for s, n in per_class.items():
            pooled[s] += n
    return max(pooled.values()) / tokens if pooled and tokens else None


def removal_size(num_experts: int, share: float) -> int:
    """How many of `num_experts` make `share` of them (at least one)."""
    return max(1, round(num_experts * share))


def domain_removal(handle: ModelHandle, batches: list, domains: list[str], own: dict[int, np.ndarray],
                   *, declared: list[str] | None = None, draws: int = 3, seed: int = 0) -> dict:
    """Per domain: ΔCE on it and on the others when its own experts are excluded in every layer
    (the declared expert when the model names them), and the same for m random experts per layer."""
    meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    g = np.random.default_rng(seed)
    m = next(iter(own.values())).shape[1]
    rows = []
    index = {name: i for i, name in enumerate(declared or [])}

    def measure(chosen: dict[int, list[int]]) -> dict:
        res = meter.measure(lambda: route_intervention(handle, {la: exclude(e) for la, e in chosen.items()}))
        return res["by_domain"]

    for ci, d in enumerate(domains):
        kinds = {"own": {la: own[la][ci].tolist() for la in own}}
        if d in index:
            kinds["declared"] = {la: [index[d]] for la in own}
        for kind, chosen in kinds.items():
            rows.append({"domain": d, "removed": kind, **_target_vs_rest(measure(chosen), d)})
        for r in range(draws):
            chosen = {la: g.choice(handle.moe_layers[la].num_experts, size=m, replace=False).tolist() for la in own}
            rows.append({"domain": d, "removed": "random", "draw": r, **_target_vs_rest(measure(chosen), d)})
    summary = {}
    for kind in ("own", "declared", "random"):
        sel = [r for r in rows if r["removed"] == kind and r["target"] == r["target"]]
        if sel:
            summary[kind] = {"target": float(np.mean([r["target"] for r in sel])),
                             "others": float(np.mean([r["others"] for r in sel])),
                             "gap": float(np.mean([r["gap"] for r in sel])), "n": len(sel)}
    return {"experts_removed_per_layer": m, "rows": rows, "summary": summary}


def _target_vs_rest(by_domain: dict, target: str) -> dict:
    others = [v for k, v in by_domain.items() if k != target]
    t = by_domain.get(target, float("nan"))
    rest = float(np.mean(others)) if others else float("nan")
    return {"target": t, "others": rest, "gap": t - rest}


def preferred_domains(routing_run, layer: int) -> dict[int, str]:
    """Per expert of `layer`: the domain whose tokens it takes the largest share of, from the
    routing statistics' domain table (analyses/domain.parquet, `routing.stats`)."""
    from deepseemoe.runs.routing import RoutingRun

    rows = RoutingRun.open(routing_run).analyses().table("domain").to_dict("records")
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        if r["layer"] == layer and r["domain"] is not None and r["share"] > best.get(r["expert"], (-1.0, ""))[0]:
            best[r["expert"]] = (r["share"], r["domain"])
    return {e: d for e, (_, d) in sorted(best.items())}


def descriptions_naming(descriptions: dict[int, str], domain_of: dict[int, str],
                        words: dict[str, tuple[str, ...]]) -> dict:
    """How many experts' descriptions name the expert's domain: a word of `words[domain]` (or the
    domain's own name) appears in the description as a whole word, case-insensitively."""
    import re

    per = []
    for e, domain in sorted(domain_of.items()):
        text = descriptions.get(e)
        if text is None:
            continue
        vocab = {domain.lower(), *words.get(domain, ())}
        found = sorted(w for w in vocab if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text.lower()))
        per.append({"expert": e, "domain": domain, "named": bool(found), "words": found})
    named = sum(r["named"] for r in per)
    return {"experts": len(per), "named": named, "share": named / len(per) if per else None, "per_expert": per}
