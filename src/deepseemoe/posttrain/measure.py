"""What post-training did to a model, measured on held-out text: loss per domain and routing.

One forward pass over the evaluation batches gives both: the loss meter of the causal checks (its
within-document rule for which predictions count) and, through the MoE adapter's routing hooks, the
top-k experts of every kept token at every MoE layer.

Routing drift at a layer, between two snapshots of the same tokens:
- `drift`: the mean share of a token's K routing slots whose expert is not in its old top-k,
  1 − |old ∩ new| / K (0 for an unchanged router; 1 − K/E in expectation for a random one);
- `changed`: the share of tokens whose top-k set changed at all.
Load: each expert's share of the routing slots; its entropy over log E (1 = balanced), max/mean,
dead experts (no slot) and overloaded ones (more than twice the mean share). Specialisation: NMI of
a token's top-1 expert with its document's domain (arithmetic-mean normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepseemoe.measures import mutual_information, normalised_entropy
from deepseemoe.models.handle import ModelHandle


@dataclass
class Snapshot:
    loss: dict  # LossMeter.clean_loss(): ce, by_domain, predictions
    routing: dict[int, np.ndarray]  # MoE layer -> [T, K] experts of the kept tokens, in the router's order
    domains: np.ndarray  # [T] domain of each kept token ("" when unlabelled)
    num_experts: dict[int, int]


def kept_domains(batches: list) -> np.ndarray:
    out = []
    for b in batches:
        doc = b.doc.reshape(-1)[b.keep].tolist()
        out += [b.domains.get(d) or "" for d in doc]
    return np.asarray(out, dtype=object)


@torch.no_grad()
def snapshot(handle: ModelHandle, batches: list) -> Snapshot:
    from deepseemoe.data.tokens import token_domains
    from deepseemoe.interventions.loss import LossMeter

    seen: dict[int, list[torch.Tensor]] = {la: [] for la in handle.moe_layers}
    hooks = []
    for la, moe in handle.moe_layers.items():
        hooks += moe.adapter.observe(moe, lambda ev, la=la: seen[la].append(ev.idx.detach().cpu()))
    was_training = handle.model.training
    handle.model.eval()
    try:
        meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    finally:
        for h in hooks:
            h.remove()
        handle.model.train(was_training)
    routing = {}
    for la, chunks in seen.items():
        routing[la] = torch.cat([c.reshape(b.input_ids.numel(), -1)[b.keep] for c, b in zip(chunks, batches, strict=True)]
                                ).numpy()
    return Snapshot(meter.clean_loss(), routing, kept_domains(batches),
                    {la: m.num_experts for la, m in handle.moe_layers.items()})


def _onehot(ids: np.ndarray, E: int) -> np.ndarray:
    oh = np.zeros((len(ids), E), dtype=bool)
    np.put_along_axis(oh, ids, True, axis=1)
    return oh


def routing_drift(before: np.ndarray, after: np.ndarray, num_experts: int) -> dict:
    """Drift of the same tokens' top-k sets (module docstring): drift, changed."""
    K = before.shape[1]
    overlap = (_onehot(before, num_experts) & _onehot(after, num_experts)).sum(1)
    return {"drift": float(np.mean(1 - overlap / K)) if len(before) else 0.0,
            "changed": float(np.mean(overlap < K)) if len(before) else 0.0}


def load_measures(ids: np.ndarray, num_experts: int) -> dict:
    load = np.bincount(ids.reshape(-1), minlength=num_experts) / max(ids.size, 1)
    ent = float(normalised_entropy(load))
    return {"entropy": ent, "max_over_mean": float(load.max() * num_experts), "dead": int((load == 0).sum()),
            "overloaded": int((load > 2 / num_experts).sum())}


def domain_nmi(ids: np.ndarray, domains: np.ndarray, num_experts: int) -> float:
    """NMI of each token's top-1 expert with its domain (labelled tokens only)."""
    labelled = domains != ""
    names = sorted(set(domains[labelled]))
    if len(names) < 2:
        return float("nan")
    codes = np.searchsorted(np.asarray(names, dtype=object), domains[labelled])
    joint = np.zeros((len(names), num_experts))
    np.add.at(joint, (codes, ids[labelled, 0]), 1)
    return mutual_information(joint)[1]


def hint_held(before: np.ndarray, after: np.ndarray, hint: np.ndarray, experts: list[int], num_experts: int) -> dict:
    """At the hint's layer: the share of hint tokens (and of the others) routed to at least one hinted
    expert, before and after; and the drift of the tokens where no hint fires (should stay 0)."""
    named = np.zeros(num_experts, dtype=bool)
    named[experts] = True

    def share(ids, sel):
        return float(named[ids[sel]].any(1).mean()) if sel.any() else float("nan")

    rest = ~hint
    return {"hint_tokens": int(hint.sum()), "hint_routed_before": share(before, hint),
            "hint_routed_after": share(after, hint), "other_routed_before": share(before, rest),
            "other_routed_after": share(after, rest),
            "other_drift": routing_drift(before[rest], after[rest], num_experts)["drift"] if rest.any() else 0.0}


def compare(before: Snapshot, after: Snapshot, target: str) -> dict:
    """ΔCE per domain (after − before: negative is a gain), the target's and the others' mean
    (forgetting), and per layer drift, load and specialisation before and after."""
    d = {k: after.loss["by_domain"][k] - before.loss["by_domain"][k] for k in before.loss["by_domain"]
         if k in after.loss["by_domain"]}
    others = [v for k, v in d.items() if k != target]
    out = {"delta_ce": d, "target_delta_ce": d.get(target, float("nan")),
           "forgetting": float(np.mean(others)) if others else float("nan"),
           "ce_after": after.loss["by_domain"], "layers": {}}
    for la, ids in after.routing.items():
        E = after.num_experts[la]
        out["layers"][str(la)] = {**routing_drift(before.routing[la], ids, E),
                                  "load_before": load_measures(before.routing[la], E),
                                  "load_after": load_measures(ids, E),
                                  "nmi_before": domain_nmi(before.routing[la], before.domains, E),
                                  "nmi_after": domain_nmi(ids, after.domains, E)}
    if out["layers"]:
        out["drift"] = float(np.mean([v["drift"] for v in out["layers"].values()]))
        out["changed"] = float(np.mean([v["changed"] for v in out["layers"].values()]))
    return out
