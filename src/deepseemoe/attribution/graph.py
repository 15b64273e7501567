"""An attribution graph of one prompt through an MoE model and its dictionaries.

Nodes (kind): `token` (each input position), `feature` (an active latent of an SAE on a block's input,
of a transcoder replacing a block, or of a cross-layer transcoder replacing several: its index the
CLT's own latent number, `extra["layer_feature"]` its number within its layer), `error` (what that
dictionary misses, per position and layer), `router` (layer, position, chosen expert: the router
logit of that choice), `expert` (what the chosen expert
wrote, weight applied; value = its norm), `shared` (a shared expert's output), `mlp` (a block taken as
given: a dense MLP without a transcoder), `logit` (the demeaned logit of a candidate next token at the
last position: logit − mean logit, circuit-tracer's target).

Edges: `adjacency[t, s]` is the direct effect of node s on node t in the linear replacement forward
(frozen.py): a source's output vector dotted with the gradient of t at the place it writes. Exact:
Σ_s adjacency[t, s] + bias[t] = value[t], where bias[t] gathers the model's and the dictionary's bias
terms (zero for a router logit of a bias-free model without an SAE in front, or for a logit of a
bias-free model). A feature's incoming edges add up to its pre-activation (= its activation when it
fires). Besides these, `gates` link each router node to its expert node, weighted by the expert node's
value: undo the routing decision and the expert writes nothing. They are not additive inputs (they are
left out of completeness) but carry influence in pruning.

Each router node also records the expert's routing weight, the margin of its logit over the best
expert not chosen (how far a push must go to flip the choice, in logit units of this router) and the
Jacobian of the chosen weights with respect to the chosen logits (the softmax / renormalisation,
linearised at the prompt).

Influence and pruning follow circuit-tracer: rows of |adjacency| normalised to sum 1, influence on the
logits (weighted by their probabilities) summed over all path lengths; nodes kept up to a cumulative
share of influence (tokens and logits always, and the router node of every kept expert), then edges
likewise (gate links of kept pairs always).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepseemoe.attribution.frozen import (
    CleanPass,
    LayerPlan,
    LinearReplacement,
    at_positions,
    check_experts,
    clean_pass,
    expert_vectors,
    frozen_mlp,
    shared_mlp,
)
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle
from deepseemoe.models.routers import router_linear

KINDS = ("token", "feature", "error", "router", "expert", "shared", "mlp", "logit")


@dataclass
class Node:
    kind: str
    layer: int  # -1 for tokens, num_layers for logits
    pos: int
    index: int  # token id, feature, expert or vocabulary id; -1 where none
    value: float
    extra: dict = field(default_factory=dict)


@dataclass
class AttributionGraph:
    prompt_ids: list[int]
    tokens: list[str]
    nodes: list[Node]
    adjacency: torch.Tensor  # [N, N] float32, target row, source column
    bias: torch.Tensor  # [N]: value − Σ incoming edges (0 for nodes without incoming edges)
    gates: list[tuple[int, int, float]]  # (expert node, router node, weight)
    logit_probabilities: dict[int, float]  # logit node -> its probability
    target: int  # the logit node of the target token
    dictionaries: dict[int, str]  # layer -> the dictionary explaining it
    seconds: float = 0.0
    influence: torch.Tensor | None = None  # [N], after `prune`
    node_mask: torch.Tensor | None = None
    edge_mask: torch.Tensor | None = None
    summary: dict = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind == kind]

    def influence_matrix(self) -> torch.Tensor:
        """The adjacency with the gate links added (what influence flows through)."""
        A = self.adjacency.clone()
        for t, s, w in self.gates:
            A[t, s] = w
        return A


def _margins(handle: ModelHandle, layer: int, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[S, K] for each chosen expert, its logit minus the logit it would need to lose its place to the
    best expert not chosen (logit units). Sigmoid routers with a correction bias choose on
    sigmoid(z) + bias: the threshold is mapped back to a logit."""
    moe = handle.moe_layers[layer]
    chosen = torch.zeros_like(z, dtype=torch.bool).scatter_(1, idx, True)
    if moe.router_family == "sigmoid_bias_group":
        from deepseemoe.models.routers import group_mask

        router = moe.router
        bias = router.e_score_correction_bias.detach().float()
        choice = z.sigmoid() + bias
        # the competitors are the experts of the groups the token may use (the group limit is kept)
        allowed = group_mask(choice, int(router.num_group), int(router.topk_group), "sum2")
        best_out = choice.masked_fill(chosen | ~allowed, float("-inf")).max(1).values  # [S]
        need = (best_out[:, None] - bias[idx]).clamp(1e-6, 1 - 1e-6)
        return z.gather(1, idx) - torch.logit(need)
    best_out = z.masked_fill(chosen, float("-inf")).max(1).values
    return z.gather(1, idx) - best_out[:, None]


def _weight_jacobian(handle: ModelHandle, layer: int, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """[S, K, K] ∂w_k/∂z_{idx_j} of the router's own selection rule at the prompt's logits, the
    chosen set held; None when DeepSeeMoE has no selector for this router."""
    moe = handle.moe_layers[layer]
    zz = z.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            sel_idx, w = moe.adapter.select(moe, zz)
    except NotImplementedError:
        return None
    if not torch.equal(sel_idx.sort(1).values, idx.sort(1).values):
        return None
    order = [(sel_idx[s][:, None] == idx[s][None, :]).float().argmax(0) for s in range(len(idx))]
    w = torch.stack([w[s, order[s]] for s in range(len(idx))])  # [S, K] in idx's order
    rows = []
    for k in range(idx.shape[1]):
        (g,) = torch.autograd.grad(w[:, k].sum(), zz, retain_graph=True)
        rows.append(g.gather(1, idx))
    return torch.stack(rows, 1)


def layer_plans(handle: ModelHandle, dictionaries: dict[str, tuple]) -> tuple[dict[int, LayerPlan], list[str]]:
    """A plan per layer from the dictionaries {name: (coder, meta)}; notes on what was not used."""
    plans: dict[int, LayerPlan] = {}
    notes: list[str] = []
    for layer in range(handle.num_layers):
        plans[layer] = LayerPlan(layer, "experts" if layer in handle.moe_layers else "frozen")
    for name, (coder, meta) in dictionaries.items():
        kind = meta.get("kind", coder.cfg.kind)
        sources, targets = [tuple(s) for s in meta["source"]], [tuple(s) for s in meta["target"]]
        if kind == "clt":
            _plan_clt(plans, notes, handle, name, coder, sources, targets)
            continue
        if kind == "crosscoder":
            raise DeepSeeMoEError(f"{name} is a crosscoder; attribute reads SAEs on a block input, (skip-)transcoders "
                                  "from a block input to its output and cross-layer transcoders")
        (skind, layer), (tkind, tlayer) = sources[0], targets[0]
        plan = plans[layer]
        if plan.dictionary:
            raise DeepSeeMoEError(f"two dictionaries explain layer {layer} ({plan.dictionary} and {name}); pass one "
                                  "per layer")
        if kind == "sae":
            if skind != "block_in":
                notes.append(f"{name} reads {skind} of layer {layer}, not a block input: router edges need the "
                             "router's own input, so the graph is built without it")
                continue
            if layer not in handle.moe_layers:
                notes.append(f"{name} reads the input of layer {layer}, which is not an MoE layer; the graph is "
                             "built without it")
                continue
            plan.sae, plan.sae_name = coder.folded().float().eval(), name
        elif kind in ("transcoder", "skip_transcoder"):
            if (skind, tkind) != ("block_in", "block_out") or layer != tlayer:
                notes.append(f"{name} maps {skind} to {tkind}, not a block's input to its output; the graph is "
                             "built without it")
                continue
            plan.mode, plan.transcoder, plan.transcoder_name = "transcoder", coder.folded().float().eval(), name
            if layer in handle.moe_layers:
                notes.append(f"layer {layer}: {name} replaces the MoE block, so the graph has no routing nodes there")
        else:
            raise DeepSeeMoEError(f"{name} is a {kind}; attribute reads SAEs on a block input and transcoders")
    return plans, notes


def _plan_clt(plans: dict[int, LayerPlan], notes: list[str], handle: ModelHandle, name: str, coder, sources: list,
              targets: list) -> None:
    """A cross-layer transcoder replaces the blocks of all its layers: each layer reads the features its
    site encodes from that block's input, and every block output is what the features of its own and
    earlier sites decode to it, plus an error."""
    layers = [la for _, la in sources]
    if [k for k, _ in sources] != ["block_in"] * len(layers) or targets != [("block_out", la) for la in layers]:
        raise DeepSeeMoEError(f"{name} is a cross-layer transcoder that does not map block inputs to the outputs of "
                              "the same layers; attribute reads CLTs trained from block_in to block_out")
    taken = [la for la in layers if plans[la].dictionary]
    if taken:
        raise DeepSeeMoEError(f"two dictionaries explain layer {taken[0]} ({plans[taken[0]].dictionary} and {name}); "
                              "pass one per layer")
    folded = coder.folded().float().eval()
    for site, layer in enumerate(layers):
        plan = plans[layer]
        plan.mode, plan.clt, plan.clt_site, plan.transcoder_name = "transcoder", folded, site, name
        plan.clt_layers = tuple(layers)
    moe = [la for la in layers if la in handle.moe_layers]
    if moe:
        notes.append(f"layers {', '.join(map(str, moe))}: {name} replaces the MoE blocks, so the graph has no "
                     "routing nodes there")


def _clt_readings(plans: dict[int, LayerPlan], clean: CleanPass) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each CLT of the plans encoded once on the prompt: id(clt) -> (latents [S, n_sites, F_site],
    reconstruction [S, n_sites, D])."""
    readings = {}
    for plan in plans.values():
        clt = plan.clt
        if clt is None or id(clt) in readings:
            continue
        x = torch.cat([clean.block_in[la] for la in plan.clt_layers], -1)
        with torch.no_grad():
            out = clt(x)
        S, n = x.shape[0], len(plan.clt_layers)
        readings[id(clt)] = (out.latents.view(S, n, -1), out.out.view(S, n, -1))
    return readings


def node_inventory(handle: ModelHandle, clean: CleanPass, plans: dict[int, LayerPlan], logit_ids: list[int],
               tokens: list[str]) -> tuple[LinearReplacement, list[Node], list[tuple[int, int, float]]]:
    rep = LinearReplacement(handle, clean, plans)
    nodes: list[Node] = []
    gates: list[tuple[int, int, float]] = []
    S = len(clean.ids)

    def add(node: Node) -> int:
        nodes.append(node)
        return len(nodes) - 1

    readings = _clt_readings(plans, clean)
    embed = rep.source("embed")
    for p in range(S):
        embed.node.append(add(Node("token", -1, p, int(clean.ids[p]), 1.0, {"token": tokens[p]})))
        embed.pos.append(p)
        embed.vec.append(clean.embeddings[p])

    for layer in range(handle.num_layers):
        plan = plans[layer]
        if layer not in clean.block_out:
            continue
        out = rep.source(f"out{layer}")
        x = clean.block_in[layer]
        if plan.mode == "frozen":
            for p in range(S):
                v = clean.block_out[layer][p]
                out.node.append(add(Node("mlp", layer, p, -1, float(v.norm()))))
                out.pos.append(p)
                out.vec.append(v)
            continue
        if plan.clt is not None:
            _clt_layer_nodes(rep, plan, readings[id(plan.clt)], clean, add)
            continue
        coder = plan.sae if plan.mode == "experts" else plan.transcoder
        if coder is not None:
            with torch.no_grad():
                lat = coder.encode(x)
                recon = coder.decode(lat, x)
            real = x if plan.mode == "experts" else clean.block_out[layer]
            err = real - recon
            where = out if plan.mode == "transcoder" else rep.source(f"in{layer}")
            ps, fs = lat.nonzero(as_tuple=True)
            ids = []
            name = plan.dictionary
            for p, f in zip(ps.tolist(), fs.tolist(), strict=True):
                a = float(lat[p, f])
                i = add(Node("feature", layer, p, f, a, {"dictionary": name,
                                                         "site": "block_in" if plan.mode == "experts" else "block_out"}))
                ids.append(i)
                where.node.append(i)
                where.pos.append(p)
                where.vec.append(a * coder.W_dec[f].detach())
            rep.targets[f"feat{layer}"] = (ids, {"pos": ps, "feature": fs})
            for p in range(S):
                where.node.append(add(Node("error", layer, p, -1, float(err[p].norm()), {"dictionary": name})))
                where.pos.append(p)
                where.vec.append(err[p])
        if plan.mode != "experts":
            continue
        moe = handle.moe_layers[layer]
        check_experts(moe)
        W_r, b_r = router_linear(handle, layer)
        W_r, b_r = W_r.float(), (b_r.float() if b_r is not None else None)
        idx, w = clean.idx[layer], clean.weights[layer]
        z = x @ W_r.T + (b_r if b_r is not None else 0)
        if layer in clean.router_logits and not torch.allclose(z, clean.router_logits[layer], atol=1e-4, rtol=1e-4):
            raise DeepSeeMoEError(f"layer {layer}: the router's logits are not W_r·x + b; attribution needs a linear router")
        margins = _margins(handle, layer, z, idx)
        jac = _weight_jacobian(handle, layer, z, idx)
        vectors = expert_vectors(handle, clean, layer)  # [S, K, D]
        K = idx.shape[1]
        router_ids, expert_ids, units = [], [], []
        for p in range(S):
            for k in range(K):
                e = int(idx[p, k])
                extra = {"weight": float(w[p, k]), "logit": float(z[p, e]), "margin": float(margins[p, k]),
                         "rank": k}
                if jac is not None:
                    extra["dweight_dlogit"] = {int(idx[p, j]): float(jac[p, k, j]) for j in range(K)}
                r = add(Node("router", layer, p, e, float(z[p, e]), extra))
                v = vectors[p, k]
                norm = float(v.norm())
                x_node = add(Node("expert", layer, p, e, norm, {"weight": float(w[p, k])}))
                gates.append((x_node, r, norm))
                router_ids.append(r)
                expert_ids.append(x_node)
                units.append(v / norm if norm > 0 else torch.zeros_like(v))
                out.node.append(x_node)
                out.pos.append(p)
                out.vec.append(v)
        pos = torch.arange(S).repeat_interleave(K)
        rep.targets[f"router{layer}"] = (router_ids, {"pos": pos, "expert": idx.reshape(-1), "W_r": W_r, "b_r": b_r})
        rep.targets[f"expert{layer}"] = (expert_ids, {"pos": pos, "expert": idx.reshape(-1), "weight": w.reshape(-1),
                                                      "clean_vectors": vectors.reshape(S * K, -1)})
        rep.unit[layer] = torch.stack(units)
        shared = clean.block_out[layer] - vectors.sum(1)
        if moe.shared_paths:
            mlp = shared_mlp(handle, layer)
            linear = False
            if mlp is not None:
                with torch.no_grad():
                    m = frozen_mlp(mlp, x.to(next(mlp.parameters()).dtype)).float()
                gate = (shared * m).sum(-1) / (m * m).sum(-1).clamp_min(1e-30)
                linear = bool(torch.allclose(gate[:, None] * m, shared, atol=1e-4, rtol=1e-3))
            shared_ids, shared_units = [], []
            for p in range(S):
                v = shared[p]
                norm = float(v.norm())
                i = add(Node("shared", layer, p, -1, norm, {"linearised": linear}))
                shared_ids.append(i)
                shared_units.append(v / norm if norm > 0 else torch.zeros_like(v))
                out.node.append(i)
                out.pos.append(p)
                out.vec.append(v)
            if linear:
                rep.shared_linear[layer] = (mlp, gate)
                rep.shared_unit[layer] = torch.stack(shared_units)
                rep.targets[f"shared{layer}"] = (shared_ids, {})
        elif float(shared.abs().max()) > 1e-4 * max(1.0, float(clean.block_out[layer].abs().max())):
            raise DeepSeeMoEError(f"layer {layer}: the block's output is not the sum of its chosen experts' outputs "
                                  f"({moe.combine}); attribution does not support this block yet")

    last = S - 1
    logit_nodes = []
    for v in logit_ids:
        logit_nodes.append(add(Node("logit", handle.num_layers, last, v, 0.0)))
    rep.targets["logit"] = (logit_nodes, {})
    rep.logit_ids = list(logit_ids)
    return rep, nodes, gates


def _clt_layer_nodes(rep: LinearReplacement, plan: LayerPlan, reading: tuple[torch.Tensor, torch.Tensor],
                     clean: CleanPass, add) -> None:
    """One layer of a CLT: the features its site encodes here (each writing its decoder rows into this
    block's output and the later ones it reaches: one node, several places, its edges their sum) and
    the error of this layer's output (what all the sites' features together miss here)."""
    clt, site, layer, name = plan.clt, plan.clt_site, plan.layer, plan.transcoder_name
    latents, recon = reading
    lat = latents[:, site]  # [S, F_site]
    F_site = lat.shape[1]
    W = clt.W_dec[site].detach()  # [F_site, n_sites − site, D]
    reach = clt.reach(W)
    ps, fs = lat.nonzero(as_tuple=True)
    ids = []
    for p, f in zip(ps.tolist(), fs.tolist(), strict=True):
        a = float(lat[p, f])
        i = add(Node("feature", layer, p, site * F_site + f, a, {"dictionary": name, "site": "block_out",
                                                                "layer_feature": f}))
        ids.append(i)
        for j in range(reach):
            where = rep.source(f"out{plan.clt_layers[site + j]}")
            where.node.append(i)
            where.pos.append(p)
            where.vec.append(a * W[f, j])
    rep.targets[f"feat{layer}"] = (ids, {"pos": ps, "feature": fs})
    err = clean.block_out[layer] - recon[:, site]
    out = rep.source(f"out{layer}")
    for p in range(len(clean.ids)):
        out.node.append(add(Node("error", layer, p, -1, float(err[p].norm()), {"dictionary": name})))
        out.pos.append(p)
        out.vec.append(err[p])


def _logit_candidates(logits: torch.Tensor, target: int | None, max_logits: int, coverage: float) -> list[int]:
    """The most probable next tokens until `coverage` probability or `max_logits` of them; the target
    first when given."""
    probs = torch.softmax(logits.float(), -1)
    order = probs.argsort(descending=True).tolist()
    chosen = [] if target is None else [target]
    total = 0.0 if target is None else float(probs[target])
    for v in order:
        if len(chosen) >= max_logits or total >= coverage:
            break
        if v not in chosen:
            chosen.append(v)
            total += float(probs[v])
    return chosen


def build_graph(handle: ModelHandle, ids: torch.Tensor, dictionaries: dict[str, tuple], *, target: int | None = None,
                max_logits: int = 5, logit_coverage: float = 0.95, batch_size: int = 64,
                max_targets: int | None = None, progress: bool = False) -> AttributionGraph:
    """The graph of prompt ids [S] through `handle` and `dictionaries` {name: (coder, meta)}: whole
    (unpruned), or with `max_targets`, bounded before it is materialised (`_expand_bounded`)."""
    import time

    from deepseemoe.progress import progress_bar

    if max_targets is not None and max_targets < 1:
        raise DeepSeeMoEError(f"--max-nodes {max_targets}: give at least 1 node to expand (or leave it out)")
    start = time.perf_counter()
    ids = ids.reshape(-1).long()
    plans, notes = layer_plans(handle, dictionaries)
    clean = clean_pass(handle, ids)
    tok = handle.tokenizer
    tokens = [tok.decode([t]) if tok is not None else str(t) for t in ids.tolist()]
    logit_ids = _logit_candidates(clean.logits[-1], target, max_logits, logit_coverage)
    rep, nodes, gates = node_inventory(handle, clean, plans, logit_ids, tokens)
    N = len(nodes)
    order = rep.target_order()
    column = {node: j for j, node in enumerate(order)}  # a target node -> its column among the values
    sources = {name: (torch.tensor(s.node, dtype=torch.long), torch.tensor(s.pos, dtype=torch.long),
                      torch.stack(s.vec).float() if s.vec else None) for name, s in rep.sources.items()}
    bounded = max_targets is not None and max_targets < len(order)
    bar = progress_bar(disable=not progress, unit="node")
    task = bar.add_task("attribution", total=min(len(order), (max_targets or len(order)) + len(logit_ids)))
    bar.start()
    # one forward of B copies of the prompt; its autograd graph is kept and every batch of B targets
    # is one backward through it (target b of a batch on copy b), so the forward is paid once
    B = min(batch_size, len(order))
    leaves, vals, rec = rep.run(B)
    rep.check(rec)
    values = torch.zeros(N)
    values[order] = vals[0].detach()
    names = [name for name, (_, _, vec) in sources.items() if vec is not None]

    def expand(chunk: list[int], last: bool = False) -> torch.Tensor:
        """[len(chunk), N]: the direct effects of every source node on each target node of `chunk`."""
        rows = torch.arange(len(chunk))
        cols = torch.tensor([column[n] for n in chunk])
        out = torch.zeros(len(chunk), N)
        grads = torch.autograd.grad(vals[rows, cols].sum(), [leaves[name] for name in names], retain_graph=not last,
                                    allow_unused=True)
        with torch.no_grad():
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:
                    node_ids, pos, vec = sources[name]
                    # += : a CLT feature writes at several layers, its edge the sum of those direct effects
                    out[:, node_ids] += at_positions(grad[:len(chunk)], pos, vec)
        bar.advance(task, len(chunk))
        return out

    probs = torch.softmax(clean.logits[-1], -1)
    if bounded:
        weights = torch.zeros(N)  # influence is on the logits, each weighted by its probability (as `prune`)
        for n in order:
            if nodes[n].kind == "logit":
                weights[n] = float(probs[nodes[n].index])
        kept_targets, rows = _expand_bounded(expand, nodes, order, weights, gates, max_targets, B)
        chosen = set(kept_targets)
        keep = [i for i in range(N) if i not in column or i in chosen]  # sources (tokens, errors) stay
        A = torch.zeros(len(keep), len(keep))
        new = {old: i for i, old in enumerate(keep)}
        where = torch.tensor([new[n] for n in kept_targets], dtype=torch.long)
        A[where] = rows[:, keep]
        rows = None
    else:  # every row written in place: one N × N matrix at the peak
        kept_targets, keep, new = order, list(range(N)), {i: i for i in range(N)}
        A = torch.zeros(N, N)
        for i in range(0, len(order), B):
            A[order[i:i + B]] = expand(order[i:i + B], last=i + B >= len(order))
        where = torch.tensor(order, dtype=torch.long)
    bar.stop()
    leaves = vals = rec = None  # frees the retained autograd graph
    for i in order:
        nodes[i].value = float(values[i])
    kept_nodes = [nodes[i] for i in keep]
    bias = torch.zeros(len(keep))
    bias[where] = values[kept_targets] - A[where].sum(1)  # what no kept source explains (dropped nodes too)
    logit_nodes = [i for i, n in enumerate(kept_nodes) if n.kind == "logit"]
    logit_probs = {i: float(probs[kept_nodes[i].index]) for i in logit_nodes}
    for i in logit_nodes:
        kept_nodes[i].extra.update({"probability": logit_probs[i], "token": tok.decode([kept_nodes[i].index]) if tok else ""})
    kept_gates = [(new[t], new[r], w) for t, r, w in gates if t in new and r in new]
    used = {la: p.dictionary for la, p in plans.items() if p.dictionary}
    graph = AttributionGraph(ids.tolist(), tokens, kept_nodes, A, bias, kept_gates, logit_probs, logit_nodes[0], used)
    graph.seconds = time.perf_counter() - start
    graph.summary["notes"] = notes
    if bounded:
        graph.summary["bounded"] = {"max_nodes": max_targets, "targets": len(order), "expanded": len(kept_targets),
                                    "nodes_before": N, "nodes": len(keep)}
    return graph


def _expand_bounded(expand, nodes: list[Node], order: list[int], weights: torch.Tensor, gates: list,
                    max_targets: int, B: int) -> tuple[list[int], torch.Tensor]:
    """Prune before materialising, as circuit-tracer's `max_feature_nodes` does: the logits' rows
    first, then, batch by batch, the `B` pending targets of the largest influence on the logits
    (`weights`: each logit's probability) estimated from the rows so far (recomputed whenever the
    rows have grown by a quarter), until `max_targets` are expanded or no pending target has
    influence. Memory: rows × N, not N × N.
    Returns the expanded targets (logits first) and their rows."""
    logits = [n for n in order if nodes[n].kind == "logit"]
    pending = [n for n in order if nodes[n].kind != "logit"]
    expanded, parts = list(logits), [expand(logits)]
    gate_of = {}  # an expert node -> its (router node, weight): influence reaches the router through the gate
    for t, r, w in gates:
        gate_of.setdefault(t, []).append((r, w))
    influence, measured_at = None, 0
    while pending and len(expanded) - len(logits) < max_targets:
        if influence is None or len(expanded) >= 1.25 * measured_at:
            rows = torch.cat(parts)
            for k, n in enumerate(expanded):
                for r, w in gate_of.get(n, ()):
                    rows[k, r] = w
            influence, measured_at = _partial_influence(rows, expanded, weights), len(expanded)
        ranked = sorted(pending, key=lambda n: -float(influence[n]))
        chunk = [n for n in ranked[:min(B, max_targets - (len(expanded) - len(logits)))] if influence[n] > 0]
        if not chunk:
            break
        parts.append(expand(chunk))
        expanded += chunk
        chosen = set(chunk)
        pending = [n for n in pending if n not in chosen]
        influence[chunk] = 0.0  # counted; the next estimate includes what they pass on
    return expanded, torch.cat(parts)


def _partial_influence(rows: torch.Tensor, row_nodes: list[int], weights: torch.Tensor) -> torch.Tensor:
    """[N] Σ_{n≥1} weights·Aⁿ over the partial graph whose only rows are `rows` (of `row_nodes`):
    a node without a row yet receives influence and passes none on."""
    a = rows.abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-10)
    idx = torch.tensor(row_nodes, dtype=torch.long)
    current, total = weights, torch.zeros_like(weights)
    for _ in range(len(row_nodes) + 1):
        current = current[idx] @ a
        if not bool(current.any()):
            return total
        total += current
    raise DeepSeeMoEError("the attribution graph has a cycle; this is a bug in DeepSeeMoE")


# ---- influence and pruning ------------------------------------------------------------------------

def _normalised(A: torch.Tensor) -> torch.Tensor:
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def _influence(A: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_{n≥1} weights·Aⁿ for a nilpotent A (the graph is acyclic)."""
    current = weights @ A
    total = current.clone()
    for _ in range(A.shape[0] + 1):
        if not bool(current.any()):
            return total
        current = current @ A
        total += current
    raise DeepSeeMoEError("the attribution graph has a cycle; this is a bug in DeepSeeMoE")


def _threshold(scores: torch.Tensor, share: float) -> float:
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    i = min(int(torch.searchsorted(cumulative, torch.tensor(share))), len(ordered) - 1)
    return float(ordered[i])


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
    """Keep the nodes carrying `node_threshold` of the influence on the logits (tokens and logits
    always), then the edges carrying `edge_threshold` of it among those; a kept node must still reach
    the logits (and a node that has inputs must keep one)."""
    for name, t in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise DeepSeeMoEError(f"the {name} is a share of influence, between 0 and 1; got {t}")
    A = graph.influence_matrix()
    N = A.shape[0]
    w = torch.zeros(N)
    for i, p in graph.logit_probabilities.items():
        w[i] = p
    influence = _influence(_normalised(A), w)
    kinds = [n.kind for n in graph.nodes]
    always = torch.tensor([k in ("token", "logit") for k in kinds])
    has_inputs = torch.tensor([k in ("feature", "router", "expert") or (k == "shared" and n.extra.get("linearised"))
                               for k, n in zip(kinds, graph.nodes, strict=True)])
    node_mask = (influence >= _threshold(influence[~always], node_threshold)) | always
    # a kept expert keeps the routing decision that let it write (the question this graph answers): the
    # gate and the expert's input split its influence, so on a small graph the router alone can fall
    # under the threshold that its expert passes
    gate_t = torch.tensor([t for t, _, _ in graph.gates], dtype=torch.long)
    gate_s = torch.tensor([s for _, s, _ in graph.gates], dtype=torch.long)
    if len(graph.gates):
        node_mask[gate_s] |= node_mask[gate_t]
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = _normalised(pruned)
    reach = _influence(norm, w) + w
    scores = norm * reach[:, None]
    edge_mask = (scores >= _threshold(scores[scores > 0], edge_threshold)) & (scores > 0)
    if len(graph.gates):
        edge_mask[gate_t, gate_s] = True  # cleared below where either end is dropped
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask &= always | edge_mask.any(0)  # it reaches something kept
        node_mask &= always | ~has_inputs | edge_mask.any(1)  # and, if it has inputs, keeps one
        if torch.equal(before, node_mask):
            break
    graph.influence, graph.node_mask, graph.edge_mask = influence, node_mask, edge_mask
    total = float(influence[~always].sum())
    errors = torch.tensor([k == "error" for k in kinds])
    frozen = torch.tensor([k == "mlp" for k in kinds])
    graph.summary.update({
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
        "nodes": N, "kept_nodes": int(node_mask.sum()), "edges": int((A != 0).sum()), "kept_edges": int(edge_mask.sum()),
        "kept_influence": float(influence[node_mask & ~always].sum()) / total if total > 0 else 0.0,
        # circuit-tracer's replacement view: how much of the influence reaching the logits starts at an error node
        "error_influence": float(influence[errors].sum()) / total if total > 0 else 0.0,
        "frozen_block_influence": float(influence[frozen].sum()) / total if total > 0 else 0.0,
    })
    return graph
