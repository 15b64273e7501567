"""How far the linear graph is from the model: zero the most influential features of a graph one at a
time, in the model run for real (routing, attention and norms free), and compare with what the
linearised model predicts.

For each tested feature (an active latent of an SAE on an MoE block's input, at one position):
- the linear prediction: the change of the target's demeaned logit in the linearised model (attention
  patterns, norm scales, routing and expert gates held at the prompt: `LinearReplacement` connected),
  the total effect of removing the feature's output a·w_dec from the block input;
- the actual change: the same edit (`interventions.sites.rewrite_site` on the block input) in the
  model's own forward, where every router chooses again;
- which routing decisions changed: the chosen top-k set of each (layer, position) at or after the
  feature's layer, compared with the prompt's.

The baseline beside the prediction's error is the error of predicting no change at all (|actual|):
a linear graph worth reading predicts better than that.
"""

from __future__ import annotations

import statistics

import torch

from deepseemoe.attribution.frozen import clean_pass
from deepseemoe.attribution.graph import AttributionGraph, layer_plans, node_inventory
from deepseemoe.capture.core import Site
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.interventions.sites import rewrite_site, routing_hooks
from deepseemoe.models.handle import ModelHandle


def _demeaned(logits: torch.Tensor, v: int) -> float:
    return float(logits[v] - logits.mean())


def routing_perturbation(handle: ModelHandle, graph: AttributionGraph, dictionaries: dict[str, tuple], *,
                         top: int = 8) -> dict | None:
    """Zero each of the `top` most influential block-input features of a pruned `graph` (built from
    `dictionaries`) and compare the target logit's change with the linear prediction; None when the
    graph has no such feature."""
    if graph.influence is None:
        raise ValueError("prune the graph first: the features tested are the most influential")
    candidates = [i for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.extra.get("site") == "block_in"
                  and n.value != 0]
    candidates.sort(key=lambda i: -float(graph.influence[i]))
    tested = candidates[:top]
    if not tested:
        return None
    ids = torch.tensor(graph.prompt_ids)
    plans, _ = layer_plans(handle, dictionaries)
    clean = clean_pass(handle, ids)
    logit_ids = [graph.nodes[i].index for i in graph.logit_probabilities]
    rep, nodes, _ = node_inventory(handle, clean, plans, logit_ids, graph.tokens)
    if [(n.kind, n.layer, n.pos, n.index) for n in nodes] != [(n.kind, n.layer, n.pos, n.index) for n in graph.nodes]:
        raise DeepSeeMoEError("the graph was built from another model, prompt or dictionaries than those given")
    vectors = {}  # node -> (leaf, position, its output vector)
    for name, src in rep.sources.items():
        for node, pos, vec in zip(src.node, src.pos, src.vec, strict=True):
            vectors[node] = (name, pos, vec)
    target = graph.nodes[graph.target].index
    target_col = logit_ids.index(target)
    D = clean.block_in[next(iter(clean.block_in))].shape[-1]
    # the linearised model: row 0 the prompt, row b + 1 the prompt with tested feature b removed
    inject = {name: torch.zeros(len(tested) + 1, len(ids), D) for name in rep.sources}
    for b, i in enumerate(tested):
        leaf, pos, vec = vectors[i]
        inject[leaf][b + 1, pos] -= vec
    rep.connected = True
    with torch.no_grad():
        _, logits, _ = rep.run(len(tested) + 1, inject)
    ref = _demeaned(clean.logits[-1], target)
    if abs(float(logits[0, target_col]) - ref) > 1e-3 * max(1.0, abs(ref)):
        raise DeepSeeMoEError(f"{handle.name}: the linearised model does not reproduce the target logit at the prompt "
                              f"({float(logits[0, target_col]):.4g} vs {ref:.4g}); its blocks cannot be linearised yet")
    linear = (logits[1:, target_col] - logits[0, target_col]).tolist()

    rows = []
    for b, i in enumerate(tested):
        n = graph.nodes[i]
        _, pos, vec = vectors[i]

        def edit(h, pos=pos, vec=vec):
            h = h.clone()
            h[0, pos] -= vec.to(h.dtype)
            return h

        calls: dict[int, list[torch.Tensor]] = {}
        layers = [la for la in handle.moe_layers if la >= n.layer]
        hooks = [rewrite_site(handle, Site("block_in", n.layer), edit), *routing_hooks(handle, layers, calls)]
        try:
            with torch.no_grad():
                out = handle.model(ids[None]).logits[0, -1].float()
        finally:
            for h in hooks:
                h.remove()
        changed, decisions, own = 0, 0, False
        for la in layers:
            now = calls[la][0].reshape(len(ids), -1).long().sort(1).values
            was = clean.idx[la].sort(1).values
            diff = (now != was).any(1)
            changed += int(diff.sum())
            decisions += len(ids)
            own = own or (la == n.layer and bool(diff[n.pos]))
        actual = _demeaned(out, target) - ref
        rows.append({"node": i, "layer": n.layer, "pos": n.pos, "feature": n.index,
                     "dictionary": n.extra.get("dictionary", ""), "activation": n.value,
                     "influence": float(graph.influence[i]), "linear": linear[b], "actual": actual,
                     "routing_changed": changed, "routing_decisions": decisions, "own_decision_changed": own})
    errors = [abs(r["actual"] - r["linear"]) for r in rows]
    held = [abs(r["actual"] - r["linear"]) for r in rows if r["routing_changed"] == 0]
    moved = [abs(r["actual"] - r["linear"]) for r in rows if r["routing_changed"] > 0]
    return {
        "tested": len(rows),
        "features_changing_routing": sum(r["routing_changed"] > 0 for r in rows),
        "routing_changed_share": statistics.fmean(r["routing_changed"] / r["routing_decisions"] for r in rows),
        "median_abs_error": statistics.median(errors),
        # the baseline: predicting no change at all
        "median_abs_actual": statistics.median(abs(r["actual"]) for r in rows),
        "median_abs_error_routing_held": statistics.median(held) if held else None,
        "median_abs_error_routing_changed": statistics.median(moved) if moved else None,
        "features": rows,
    }
