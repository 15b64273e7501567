"""Causal checks of routing: what the loss does when experts or routers are taken away.

Every number is a mean next-token cross-entropy difference (ΔCE, nats/token) against the clean
model on the same held-out tokens, overall and per domain, plus KL(clean ‖ intervened):

- expert ablation (weight 0, slot kept) and exclusion (the router re-selects without it), per
  MoE layer and expert, each against a *load-matched control*: the same fraction of that layer's
  routing slots, chosen uniformly at random (seeded), zeroed — as much damage, no specialisation;
- DeepSeekMoE's sweep: the top-r routed experts of every token disabled in every MoE layer
  (weights zeroed, the rest rescaled to the token's original total), r = 1..K-1;
- top-1-only routing per layer (the other slots zeroed, the top one given the original total);
- router corruption per layer: uniformly random top-K experts in one layer, the router's
  weights kept in rank order;
- observational vs causal: per layer, Spearman correlation across experts between load, mean
  gate weight or mean output norm and the expert's ablation ΔCE.

Which predictions count is the loss meter's rule (`interventions.loss`).

Shapes: input ids [B, S]; per-token losses [B, S-1]; routing idx/weights [T, K].
"""

from __future__ import annotations

import numpy as np
import torch

from deepseemoe.data.tokens import token_domains
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.interventions.loss import LossMeter
from deepseemoe.interventions.routing import ablate, exclude, random_routing, route_intervention
from deepseemoe.models.handle import ModelHandle, MoELayer, RoutingRewrite


def spearman(a, b) -> float:
    """Rank correlation with average ranks for ties; nan when either side is constant."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def drop_slots(fraction: float, seed: int) -> RoutingRewrite:
    """Zero each routing slot with probability `fraction` (the load-matched control)."""
    gens: dict[int, torch.Generator] = {}

    def rewrite(layer: MoELayer, idx, w, logits):
        g = gens.setdefault(layer.layer, torch.Generator().manual_seed(seed * 7919 + layer.layer))
        hit = (torch.rand(idx.shape, generator=g) < fraction).to(w.device)
        return idx, w.masked_fill(hit, 0)

    return rewrite


def disable_top(r: int) -> RoutingRewrite:
    """Zero each token's r highest-weighted slots; the rest take the token's original total."""
    def rewrite(layer, idx, w, logits):
        top = w.topk(min(r, w.shape[-1]), dim=-1).indices
        new = w.scatter(-1, top, 0.0)
        total, kept = w.sum(-1, keepdim=True), new.sum(-1, keepdim=True)
        return idx, torch.where(kept > 0, new * total / kept.clamp_min(torch.finfo(w.dtype).tiny), new)

    return rewrite


def top1_only() -> RoutingRewrite:
    def rewrite(layer, idx, w, logits):
        top = w.argmax(-1, keepdim=True)
        return idx, torch.zeros_like(w).scatter(-1, top, w.sum(-1, keepdim=True))

    return rewrite


@torch.no_grad()
def observe_experts(handle: ModelHandle, batches: list) -> dict[int, dict[str, np.ndarray]]:
    """Per MoE layer and expert: load (share of routing slots), mean gate weight when chosen, mean
    norm of its weighted output w·E(x) when chosen."""
    stats = {layer: {"slots": np.zeros(m.num_experts), "weight": np.zeros(m.num_experts),
                     "norm": np.zeros(m.num_experts)} for layer, m in handle.moe_layers.items()}
    device = next(handle.model.parameters()).device
    for b in batches:
        hooks = []
        keep = b.keep.to(device)  # the kept tokens (no padding, no BOS): the tokens `route` counts
        for layer, moe in handle.moe_layers.items():
            def cb(ev, layer=layer, moe=moe, keep=keep):
                idx, w = ev.idx[keep], ev.weights[keep]
                outs = moe.adapter.expert_outputs(moe, ev.x[keep], idx)  # [T, K, D] unweighted
                norms = (outs * w[..., None]).norm(dim=-1)
                s = stats[layer]
                flat = idx.reshape(-1).cpu().numpy()
                np.add.at(s["slots"], flat, 1)
                np.add.at(s["weight"], flat, w.reshape(-1).float().cpu().numpy())
                np.add.at(s["norm"], flat, norms.reshape(-1).float().cpu().numpy())
            hooks += moe.adapter.observe(moe, cb)
        try:
            handle.model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    out = {}
    for layer, s in stats.items():
        chosen = np.maximum(s["slots"], 1)
        out[layer] = {"load": s["slots"] / s["slots"].sum(), "gate_weight": s["weight"] / chosen,
                      "output_norm": s["norm"] / chosen}
    return out


def run_causal_checks(handle: ModelHandle, batches: list, *, layers: list[int] | None = None,
                      experts: list[int] | None = None, seed: int = 0, progress: bool = True) -> dict:
    from deepseemoe.progress import progress_bar

    layers = layers or sorted(handle.moe_layers)
    bad = [la for la in layers if la not in handle.moe_layers]
    if bad:
        raise DeepSeeMoEError(f"layers {bad} are not MoE layers of {handle.name}; choose from {sorted(handle.moe_layers)}")
    fewest = min(handle.moe_layers[la].num_experts for la in layers)
    bad = [e for e in experts or [] if not 0 <= e < fewest]
    if bad:
        raise DeepSeeMoEError(f"experts {bad} do not exist in layers {layers} ({fewest} experts: 0–{fewest - 1}); "
                              "choose existing ones")
    if not batches:
        raise DeepSeeMoEError("no held-out tokens to measure on; give more text or a larger --tokens")
    meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    observed = observe_experts(handle, batches)
    rows, per_layer, sweep = [], [], []
    jobs = [(la, e) for la in layers for e in (experts or range(handle.moe_layers[la].num_experts))]
    K = max(m.top_k for m in handle.moe_layers.values())
    with progress_bar(disable=not progress, unit="ablations") as bar:
        task = bar.add_task("ablations", total=len(jobs) * 3 + len(layers) * 2 + max(K - 1, 0))
        for layer, e in jobs:
            load = float(observed[layer]["load"][e])
            res = {}
            for name, rw in (("ablate", ablate([e])), ("exclude", exclude([e])),
                             ("control", drop_slots(load, seed + e))):
                res[name] = meter.measure(lambda rw=rw, layer=layer: route_intervention(handle, {layer: rw}))
                bar.advance(task)
            rows.append({"layer": layer, "expert": e, "load": load,
                         "gate_weight": float(observed[layer]["gate_weight"][e]),
                         "output_norm": float(observed[layer]["output_norm"][e]),
                         **{f"{k}_delta_ce": v["delta_ce"] for k, v in res.items()},
                         **{f"{k}_kl": v["kl"] for k, v in res.items()},
                         "ablate_by_domain": res["ablate"]["by_domain"],
                         "control_by_domain": res["control"]["by_domain"]})
        for layer in layers:
            corrupt = meter.measure(lambda layer=layer: route_intervention(handle, {layer: random_routing(seed)}))
            bar.advance(task)
            top1 = meter.measure(lambda layer=layer: route_intervention(handle, {layer: top1_only()}))
            bar.advance(task)
            per_layer.append({"layer": layer, "random_routing_delta_ce": corrupt["delta_ce"],
                              "random_routing_kl": corrupt["kl"], "top1_only_delta_ce": top1["delta_ce"],
                              "top1_only_kl": top1["kl"]})
        for r in range(1, K):
            res = meter.measure(lambda r=r: route_intervention(handle, {la: disable_top(r) for la in handle.moe_layers}))
            bar.advance(task)
            sweep.append({"disabled_top_r": r, "delta_ce": res["delta_ce"], "kl": res["kl"]})
    correlations = []
    for layer in layers:
        mine = [r for r in rows if r["layer"] == layer]
        if len(mine) > 2:
            causal = [r["ablate_delta_ce"] for r in mine]
            correlations.append({"layer": layer, **{f"spearman_{k}": spearman([r[k] for r in mine], causal)
                                                    for k in ("load", "gate_weight", "output_norm")}})
    return {"experts": rows, "layers": per_layer, "disable_top_r": sweep, "observational_vs_causal": correlations,
            "tokens": int(sum(int(v.sum()) for v in meter.valid))}
