"""How many layers a cross-layer dictionary's features write to (issue: which layers, how many
neighbours). For each live feature of a CLT (source layer i, decoder vectors for layers i..S−1) or a
crosscoder (one decoder vector per site), the share of its decoder's energy (squared norm, in the
target's own units: the output scale undone) that goes to each layer; its *spread* is the number of
layers holding at least `threshold` of it. Reported as the distribution over features, and for a
CLT the mean share at each offset j − i, so that a reader sees whether the neighbours are used."""

from __future__ import annotations

import numpy as np
import torch

THRESHOLD = 0.1


@torch.no_grad()
def decoder_energy(coder) -> np.ndarray:
    """[F, S] each feature's decoder energy per target site (zeros where a CLT feature cannot write:
    layers before its source layer)."""
    S = coder.cfg.n_sites
    t = coder.target_scale.detach().double().view(S, -1)
    if coder.cfg.cross_layer:
        rows = []
        for i, w in enumerate(coder.W_dec):  # [Fl, S−i, Do]
            e = ((w.detach().double() / t[i:][None]) ** 2).sum(-1)
            rows.append(torch.cat([e.new_zeros(e.shape[0], i), e], 1))
        return torch.cat(rows).cpu().numpy()
    w = coder.W_dec.detach().double().view(coder.W_dec.shape[0], S, -1)
    return ((w / t[None]) ** 2).sum(-1).cpu().numpy()


def layer_spread(coder, live: np.ndarray | None = None, threshold: float = THRESHOLD) -> dict | None:
    """The spread of each live feature (module docstring); None for a single-site dictionary."""
    S = coder.cfg.n_sites
    if S < 2:
        return None
    energy = decoder_energy(coder)
    if live is not None:
        energy = energy[np.asarray(live, dtype=bool)]
    total = energy.sum(1, keepdims=True)
    share = np.divide(energy, total, out=np.zeros_like(energy), where=total > 0)
    spread = (share >= threshold).sum(1)
    out = {"threshold": threshold, "features": len(spread),
           "histogram": {str(s): int((spread == s).sum()) for s in range(1, S + 1)},
           "mean": float(spread.mean()) if len(spread) else float("nan"),
           "multi_layer_share": float((spread > 1).mean()) if len(spread) else float("nan")}
    if coder.cfg.cross_layer and len(spread):
        Fl = coder.cfg.latents_per_group
        source = np.repeat(np.arange(S), Fl)
        if live is not None:
            source = source[np.asarray(live, dtype=bool)]
        # the mean share a feature writes at offset j − i (0: its own layer), over features that can reach it
        by_offset = []
        for d in range(S):
            can = source + d < S
            rows = np.nonzero(can)[0]
            by_offset.append(float(share[rows, source[rows] + d].mean()) if len(rows) else float("nan"))
        out["share_by_offset"] = by_offset
    return out
