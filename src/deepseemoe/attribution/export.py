"""A pruned attribution graph as circuit-tracer's graph JSON (metadata, qParams, nodes, links: the file its
frontend and Neuronpedia read), and the one sentence that names its strongest routing decision.

Node ids follow circuit-tracer for the kinds it has ("E_{token}_{pos}", "{layer}_{feature}_{pos}",
"0_{layer}_{pos}" errors, "{L+1}_{token}_{pos}" logits). The MoE kinds are new feature types with ids of
their own: "R{layer}_{expert}_{pos}" (feature_type "moe router"), "X{layer}_{expert}_{pos}" ("moe
expert"), "S{layer}_{pos}" ("moe shared expert"), "M{layer}_{pos}" ("frozen mlp"). Extra fields
(routing weight, margin, …) ride along; circuit-tracer's own models of the file ignore them.
"""

from __future__ import annotations

from deepseemoe.attribution.graph import AttributionGraph, Node

FEATURE_TYPES = {"token": "embedding", "feature": "cross layer transcoder", "error": "mlp reconstruction error",
                 "logit": "logit", "router": "moe router", "expert": "moe expert", "shared": "moe shared expert",
                 "mlp": "frozen mlp"}


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_id(node: Node, num_layers: int) -> str:
    # a feature's number within its layer, as circuit-tracer numbers a CLT's (its latent number otherwise)
    k, L, p, i = node.kind, node.layer, node.pos, node.extra.get("layer_feature", node.index)
    return {"token": f"E_{i}_{p}", "feature": f"{L}_{i}_{p}", "error": f"0_{L}_{p}", "logit": f"{num_layers + 1}_{i}_{p}",
            "router": f"R{L}_{i}_{p}", "expert": f"X{L}_{i}_{p}", "shared": f"S{L}_{p}", "mlp": f"M{L}_{p}"}[k]


def _label(node: Node, tokens: list[str]) -> str:
    e = node.extra
    if node.kind == "router":
        return (f"L{node.layer} routes {tokens[node.pos]!r} to expert {node.index} (weight {e['weight']:.3f}, "
                f"margin {e['margin']:+.2f} logits)")
    if node.kind == "expert":
        return f"L{node.layer} expert {node.index} output on {tokens[node.pos]!r} (norm {node.value:.3g})"
    if node.kind == "shared":
        return f"L{node.layer} shared expert on {tokens[node.pos]!r}"
    if node.kind == "logit":
        return f'Output "{e.get("token", node.index)}" (p={e.get("probability", 0.0):.3f})'
    if node.kind == "feature":
        return e.get("description", "")
    return ""


def graph_json(graph: AttributionGraph, *, slug: str, scan: str, prompt: str, num_layers: int,
               descriptions: dict[tuple[str, int], str] | None = None) -> dict:
    """The kept part of a pruned graph in circuit-tracer's schema (every node when it was not pruned)."""
    keep = graph.node_mask if graph.node_mask is not None else [True] * len(graph.nodes)
    ids = [node_id(n, num_layers) for n in graph.nodes]
    nodes = []
    for i, n in enumerate(graph.nodes):
        if not keep[i]:
            continue
        if descriptions and n.kind == "feature":
            n.extra.setdefault("description", descriptions.get((n.extra.get("dictionary", ""), n.index), ""))
        layer = "E" if n.kind == "token" else str(num_layers + 1 if n.kind == "logit" else n.layer)
        in_layer = n.extra.get("layer_feature", n.index)
        feature = {"token": n.pos, "feature": _cantor(max(n.layer, 0), in_layer), "error": -1, "logit": n.index,
                   "router": n.index, "expert": n.index, "shared": -1, "mlp": -1}[n.kind]
        js = {"token": f"E_{n.index}-{n.pos}", "feature": f"{n.layer}_{in_layer}-0", "logit": f"L_{n.index}-{n.pos}"} \
            .get(n.kind, f"{ids[i]}-0")
        row = {"node_id": ids[i], "feature": feature, "layer": layer, "ctx_idx": n.pos,
               "feature_type": FEATURE_TYPES[n.kind], "jsNodeId": js, "clerp": _label(n, graph.tokens),
               "token_prob": float(n.extra.get("probability", 0.0)), "is_target_logit": i == graph.target,
               "influence": None if graph.influence is None else float(graph.influence[i]),
               "activation": None if n.kind == "token" else float(n.value), "run_idx": 0, "reverse_ctx_idx": 0}
        row.update({k: v for k, v in n.extra.items() if k not in row and k != "description"})
        if n.kind == "feature":
            row["latent"] = n.index  # the dictionary's own latent number: its feature page, its description
        nodes.append(row)
    links = []
    A = graph.adjacency
    mask = graph.edge_mask if graph.edge_mask is not None else A != 0
    gates = {(t, s): w for t, s, w in graph.gates}
    for t, s in mask.nonzero().tolist():
        if keep[t] and keep[s]:
            gate = gates.get((t, s))
            links.append({"source": ids[s], "target": ids[t], "weight": float(A[t, s]) if gate is None else gate,
                          "kind": "direct" if gate is None else "gate"})
    metadata = {"slug": slug, "scan": scan, "transcoder_list": sorted(set(graph.dictionaries.values())),
                "prompt_tokens": graph.tokens, "prompt": prompt, "node_threshold": graph.summary.get("node_threshold"),
                "schema_version": 1, "deepseemoe": graph.summary}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def strongest_route(graph: AttributionGraph, layer: int | None = None) -> dict | None:
    """The kept router node (of `layer`, else of any layer) with the most influence on the logits and
    what decided it: its largest incoming edge (the source, the edge in logit units and its share of
    the node's |inputs|)."""
    routers = [i for i in graph.of_kind("router") if (graph.node_mask is None or bool(graph.node_mask[i]))
               and (layer is None or graph.nodes[i].layer == layer)]
    if not routers or graph.influence is None:
        return None
    r = max(routers, key=lambda i: float(graph.influence[i]))
    row = graph.adjacency[r]
    s = int(row.abs().argmax())
    share = float(row[s].abs() / row.abs().sum().clamp_min(1e-30))
    node, src = graph.nodes[r], graph.nodes[s]
    return {"layer": node.layer, "pos": node.pos, "token": graph.tokens[node.pos], "expert": node.index,
            "weight": node.extra["weight"], "margin": node.extra["margin"], "influence": float(graph.influence[r]),
            "decided_by": {"kind": src.kind, "layer": src.layer, "pos": src.pos, "index": src.index,
                           "dictionary": src.extra.get("dictionary", ""), "edge": float(row[s]), "share": share}}


def route_sentence(route: dict | None, tokens: list[str]) -> str:
    """One plain sentence naming the strongest routing decision and what decided it."""
    if route is None:
        return "No routing decision survived pruning."
    d = route["decided_by"]
    what = {"feature": f"feature {d['index']} of {d['dictionary']} at {tokens[d['pos']]!r}",
            "token": f"the token {tokens[d['pos']]!r} itself (its embedding)",
            "expert": f"what layer {d['layer']}'s expert {d['index']} wrote at {tokens[d['pos']]!r}",
            "error": f"the error of {d['dictionary']} (what it does not explain) at {tokens[d['pos']]!r}",
            "shared": f"layer {d['layer']}'s shared expert at {tokens[d['pos']]!r}",
            "mlp": f"layer {d['layer']}'s MLP at {tokens[d['pos']]!r}"}.get(d["kind"], d["kind"])
    return (f"The strongest routing decision sends {route['token']!r} (position {route['pos']}) to expert "
            f"{route['expert']} at layer {route['layer']} (weight {route['weight']:.2f}, {route['margin']:+.2f} logits "
            f"over the best expert not chosen); its largest input is {what}: {d['edge']:+.2f} logits, "
            f"{d['share']:.0%} of the router logit's inputs by size.")


def perturbation_sentence(p: dict | None) -> str:
    """One sentence on attribution.perturb's result: how often zeroing a feature rerouted a token and how
    close the linear graph's prediction of the target logit came, beside predicting no change."""
    if not p:
        return "No block-input feature to zero (the graph has no SAE on an MoE block's input)."
    held, moved = p["median_abs_error_routing_held"], p["median_abs_error_routing_changed"]
    split = "".join(f"; {what} {v:.3g}" for what, v in (("where routing held", held), ("where it changed", moved))
                    if v is not None)
    return (f"Zeroing each of the {p['tested']} most influential features in the model itself (routing free): "
            f"{p['features_changing_routing']} changed a routing decision ({p['routing_changed_share']:.1%} of the "
            f"decisions at or after their layer); the linear graph predicts the target logit's change within "
            f"{p['median_abs_error']:.3g} (median |error|{split}), against {p['median_abs_actual']:.3g} for "
            "predicting no change.")
