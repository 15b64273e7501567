"""Expert alignment: do a dictionary's features line up with the MoE's experts? (`evaluate`, ours)

For a dictionary whose input feeds an MoE layer l (its block input, the residual stream before it,
…), over the held-out tokens, with K the layer's top-k and a feature *live* when it fires on at
least MIN_FIRES tokens:
  concentration(f)  the share of feature f's routed slots (its firing tokens × their K experts) that
                    fall on its own K most frequent experts; uniform routing gives ≈ K/E
  aligned share     live features with concentration ≥ 1/2 / live features: half of the feature's
                    tokens' choices go to as many experts as one token picks
  domain NMI        NMI (measures.mutual_information) between each live feature's dominant domain
                    (of its firing tokens) and the dominant domain of its top expert by lift (of the
                    tokens routed to that expert): features of a domain landing on that domain's experts
Every figure stands beside two baselines: `random`, the untrained dictionary of the same shape (the
structure the input alone gives its features), and `shuffled`, the trained features with each
token's experts taken from another token of the same batch (one seeded permutation): the same load
and the same firing counts without any association — what a feature firing on that many tokens
reaches by chance.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_FIRES = 20
ALIGNED = 0.5


class AlignmentCounts:
    """Running counts for one dictionary at one MoE layer: feature × expert slots [F, E], feature ×
    domain tokens [F, D] and expert × domain slots [E, D], for the trained codes, the untrained
    dictionary's and the trained codes against shuffled routing."""

    def __init__(self, n_latents: int, num_experts: int, top_k: int):
        self.F, self.E, self.K = n_latents, num_experts, top_k
        self.domains: dict[str, int] = {}
        self.tables = {kind: {"fe": np.zeros((self.F, self.E)), "fires": np.zeros(self.F),
                              "fd": np.zeros((self.F, 0)), "ed": np.zeros((self.E, 0))}
                       for kind in ("trained", "random", "shuffled")}
        self.generator = torch.Generator().manual_seed(0)

    def _domain_onehot(self, domains: list[str]) -> torch.Tensor:
        for d in domains:
            self.domains.setdefault(d, len(self.domains))
        codes = torch.tensor([self.domains[d] for d in domains], dtype=torch.long)
        return torch.nn.functional.one_hot(codes, len(self.domains)).double()

    def add(self, latents: torch.Tensor, random_latents: torch.Tensor, experts: torch.Tensor,
            domains: list[str]) -> None:
        """One batch of T tokens: codes [T, F] (trained, untrained), chosen experts [T, K], the
        domain of each token's document."""
        T = experts.shape[0]
        chosen = torch.zeros(T, self.E, dtype=torch.float64).scatter_(1, experts.long().cpu(), 1.0)
        shuffled = chosen[torch.randperm(T, generator=self.generator)]
        dom = self._domain_onehot(domains)
        for kind, lat, routed in (("trained", latents, chosen), ("random", random_latents, chosen),
                                  ("shuffled", latents, shuffled)):
            fires = (lat.detach() > 0).double().cpu()
            t = self.tables[kind]
            t["fe"] += (fires.T @ routed).numpy()
            t["fires"] += fires.sum(0).numpy()
            t["fd"] = _grow(t["fd"], dom.shape[1]) + (fires.T @ dom).numpy()
            t["ed"] = _grow(t["ed"], dom.shape[1]) + (routed.T @ dom).numpy()

    def result(self) -> dict:
        from deepseemoe.measures import mutual_information

        out: dict = {"top_k": self.K, "num_experts": self.E, "min_fires": MIN_FIRES, "aligned_at": ALIGNED}
        for kind, t in self.tables.items():
            live = t["fires"] >= MIN_FIRES
            conc = concentration(t["fe"][live], self.K)
            entry = {"live": int(live.sum()), "aligned_share": float((conc >= ALIGNED).mean()) if live.any() else None,
                     "mean_concentration": float(conc.mean()) if live.any() else None}
            if len(self.domains) > 1 and live.any():
                joint = domain_joint(t["fe"][live], t["fd"][live], t["ed"], len(self.domains))
                entry["domain_nmi"] = mutual_information(joint)[1]
            out[kind] = entry
        out["uniform_concentration"] = self.K / self.E
        return out


def _grow(table: np.ndarray, columns: int) -> np.ndarray:
    """`table` with zero columns added up to `columns` (a domain first seen in this batch)."""
    if table.shape[1] >= columns:
        return table
    return np.concatenate([table, np.zeros((table.shape[0], columns - table.shape[1]))], axis=1)


def concentration(fe: np.ndarray, k: int) -> np.ndarray:
    """Per feature, the share of its routed slots [F, E] on its k most frequent experts."""
    total = fe.sum(1)
    top = -np.sort(-fe, axis=1)[:, :k].sum(1)
    return np.where(total > 0, top / np.maximum(total, 1e-300), 0.0)


def domain_joint(fe: np.ndarray, fd: np.ndarray, ed: np.ndarray, n_domains: int) -> np.ndarray:
    """[D, D] counts of (a feature's dominant domain, the dominant domain of its top expert by lift).
    Dominant = most over-represented against the domain's size (the largest domain would otherwise
    win everywhere): argmax over d of count(·, d) / size(d)."""
    fd, ed = fd[:, :n_domains], ed[:, :n_domains]
    slots = ed.sum(0)  # per domain: its tokens' routed slots (tokens × K)
    p_e = ed.sum(1) / max(slots.sum(), 1e-300)  # each expert's share of all slots
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = (fe / fe.sum(1, keepdims=True)) / p_e[None, :]
        feature_domain = np.nan_to_num(fd / slots[None, :], nan=-1.0).argmax(1)
        expert_domain = np.nan_to_num(ed / slots[None, :], nan=-1.0).argmax(1)
    top_expert = np.where(np.isfinite(lift), lift, -np.inf).argmax(1)
    joint = np.zeros((n_domains, n_domains))
    np.add.at(joint, (feature_domain, expert_domain[top_expert]), 1)
    return joint
