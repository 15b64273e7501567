"""Features ↔ experts: how a dictionary's features relate to the routing of the MoE layer they
feed (the layer of the coder's source site).

Shapes: latents [T, F]; expert ids [T, K]; router logits [T, E]; counts [F, E].

- P(e | f fires): over tokens where feature f is active, the share of them that route to expert e
  (each token counts once per chosen expert, so Σ_e P(e|f) = K); lift = P(e|f) / P(e) with P(e)
  the same share over all tokens (1.0 = no association);
- MI(f; e) in bits between the binary events "f fires" and "e is chosen";
- specificity of a feature: 1 − H(P(·|f)/K) / log E (1 = always the same experts, 0 = uniform);
- routing prediction (recall@K of the chosen set, on the held-out second half of the tokens), scores
  fitted on the first half: features Σ_f a_f·log-lift(f, e), token identity (the experts most chosen
  for that token id), bigram (for that (previous, current) pair, falling back to the token);
- router attribution, for an SAE on the MoE block input (the router's own input, after the norm,
  so no nonlinearity sits between): logit_e = Σ_i f_i·(W_r[e]·d_i) + W_r[e]·b_dec + W_r[e]·ε + b_e,
  ε = x − x̂; checked per token against the router's logits.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from deepseemoe.capture.core import Site
from deepseemoe.dictionaries.coder import Coder
from deepseemoe.dictionaries.stream import model_stream
from deepseemoe.measures import entropy
from deepseemoe.models.handle import ModelHandle
from deepseemoe.models.routers import router_linear


def router_attribution(coder: Coder, x: torch.Tensor, W_r: torch.Tensor, b_r: torch.Tensor | None) -> dict:
    """Exact decomposition of router logits through an SAE on the router's input x [T, D], per token
    [T, E]: the features' sum, the decoder bias's, the reconstruction error's and the router bias
    (`total` adds them up); `virtual` [F, E] = W_r[e]·d_i, a feature's logit effect per unit."""
    c = coder.folded()
    lat = c.encode(x)
    recon = lat @ c.W_dec + c.b_dec
    virtual = c.W_dec @ W_r.T  # [F, E]: W_r[e]·d_i
    features = lat @ virtual  # [T, E]
    bias_part = (c.b_dec @ W_r.T).expand_as(features)
    error_part = (x - recon) @ W_r.T
    total = features + bias_part + error_part + (b_r if b_r is not None else 0)
    return {"features": features, "b_dec": bias_part, "error": error_part, "total": total, "latents": lat,
            "virtual": virtual}


def _mi_bits(n11: np.ndarray, n1_: np.ndarray, n_1: np.ndarray, N: int) -> np.ndarray:
    """MI between two binary events from the joint count n11 and the marginals (broadcasting)."""
    n10, n01 = n1_ - n11, n_1 - n11
    n00 = N - n11 - n10 - n01
    total = np.zeros(np.broadcast(n11, n1_, n_1).shape)
    for joint, a, b in ((n11, n1_, n_1), (n10, n1_, N - n_1), (n01, N - n1_, n_1), (n00, N - n1_, N - n_1)):
        p = joint / N
        with np.errstate(divide="ignore", invalid="ignore"):
            term = p * np.log2(joint * N / (a * b))
        total += np.where(joint > 0, term, 0.0)
    return total


def feature_expert_tables(latents: torch.Tensor, idx: torch.Tensor, num_experts: int) -> dict[str, np.ndarray]:
    """Counts and the statistics above from latents [T, F] and chosen experts [T, K]."""
    fires = (latents > 0).double()
    T = idx.shape[0]
    chosen = torch.zeros(T, num_experts, dtype=torch.float64).scatter_(1, idx.long(), 1.0)
    counts = (fires.T @ chosen).numpy()  # [F, E]
    n_f = fires.sum(0).numpy()
    n_e = chosen.sum(0).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        p_e_given_f = counts / n_f[:, None]
        p_e = n_e / T
        lift = p_e_given_f / p_e[None, :]
    ent = entropy(np.nan_to_num(p_e_given_f), axis=1)  # of P(e|f)/K: each token's K slots share 1
    specificity = np.where(n_f > 0, 1 - ent / math.log(num_experts), np.nan)
    return {"counts": counts, "fires": n_f, "expert_slots": n_e, "p_e_given_f": p_e_given_f, "lift": lift,
            "mi_bits": _mi_bits(counts, n_f[:, None], n_e[None, :], T), "specificity": specificity, "tokens": T}


def recall_at_k(scores: torch.Tensor, idx: torch.Tensor) -> float:
    """Mean |top-K(scores) ∩ chosen| / K, scores [T, E], chosen [T, K]."""
    K = idx.shape[1]
    pred = scores.topk(K, dim=-1).indices
    return float((pred[:, :, None] == idx[:, None, :]).any(-1).float().mean())


def routing_prediction(latents: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor, prev: torch.Tensor,
                       num_experts: int) -> dict[str, float]:
    """recall@K on the second half of the tokens, every predictor fitted on the first half."""
    T = len(idx)
    half = T // 2
    tr, te = slice(0, half), slice(half, T)
    stats = feature_expert_tables(latents[tr], idx[tr], num_experts)
    log_lift = torch.from_numpy(np.nan_to_num(np.log(np.clip(stats["lift"], 1e-3, None)), nan=0.0)).float()
    feat_scores = (latents[te] > 0).float() @ log_lift
    base = torch.from_numpy(stats["expert_slots"]).float()

    by_token: dict[int, Counter] = defaultdict(Counter)
    by_bigram: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for t, p, row in zip(tokens[tr].tolist(), prev[tr].tolist(), idx[tr].tolist(), strict=True):
        by_token[t].update(row)
        by_bigram[(p, t)].update(row)

    def scores(table, keys):
        out = base.expand(len(keys), -1).clone() * 1e-6  # tie-break by overall load
        for i, key in enumerate(keys):
            for e, n in table.get(key, {}).items():
                out[i, e] += n
        return out

    tok_keys = tokens[te].tolist()
    token_scores = scores(by_token, tok_keys)
    bigram_scores = scores(by_bigram, list(zip(prev[te].tolist(), tok_keys, strict=True)))
    unseen = torch.tensor([(p, t) not in by_bigram for p, t in zip(prev[te].tolist(), tok_keys, strict=True)])
    bigram_scores[unseen] = token_scores[unseen]
    return {"features": recall_at_k(feat_scores, idx[te]), "token": recall_at_k(token_scores, idx[te]),
            "bigram": recall_at_k(bigram_scores, idx[te]),
            "load_only": recall_at_k(base.expand(T - half, -1), idx[te]), "test_tokens": T - half}


DENSE_ATTRIBUTION_EXPERTS = 64  # up to this many experts the feature × expert table is dense


def attribution_table(virtual: torch.Tensor, latents: torch.Tensor, top_n: int = 16) -> dict[str, np.ndarray]:
    """The feature × expert router-attribution table, one row per (feature, expert): every pair
    when E ≤ DENSE_ATTRIBUTION_EXPERTS, else each feature's `top_n` experts by |push_per_unit|.

    - logit_per_unit: W_r[e]·d_i, what one unit of feature i adds to expert e's logit;
    - push_per_unit: the same minus its mean over experts — routing is a softmax/top-k over logits,
      which a shift shared by all experts leaves unchanged, so this is the part that moves tokens
      toward (> 0) or away from (< 0) expert e;
    - mean_push_when_active: push_per_unit × the feature's mean activation where it fires;
    - mean_push_per_token: push_per_unit × the feature's mean activation over all tokens (its
      average share of expert e's routing preference).
    virtual [F, E]; latents [T, F]."""
    v = virtual.double()
    F, E = v.shape
    push = v - v.mean(1, keepdim=True)
    lat = latents.double()
    fires = (lat > 0).sum(0)
    total = lat.sum(0)
    when_active = torch.where(fires > 0, total / fires.clamp_min(1), torch.zeros_like(total))
    per_token = total / max(lat.shape[0], 1)
    if E <= DENSE_ATTRIBUTION_EXPERTS:
        f_idx = torch.arange(F).repeat_interleave(E)
        e_idx = torch.arange(E).repeat(F)
    else:
        n = min(top_n, E)
        e_idx = push.abs().topk(n, dim=1).indices.reshape(-1)
        f_idx = torch.arange(F).repeat_interleave(n)
    p = push[f_idx, e_idx]
    return {"feature": f_idx.numpy(), "expert": e_idx.numpy(), "logit_per_unit": v[f_idx, e_idx].numpy(),
            "push_per_unit": p.numpy(), "mean_push_when_active": (p * when_active[f_idx]).numpy(),
            "mean_push_per_token": (p * per_token[f_idx]).numpy()}


@dataclass
class RouterAttribution:
    """Router logits of the kept tokens split into feature and SAE-error parts (`router_attribution`)."""

    features: torch.Tensor  # [T, E] Σ_i f_i·(W_r·d_i)
    error: torch.Tensor  # [T, E] W_r·(x − x̂)
    virtual: torch.Tensor  # [F, E] W_r·d_i: the experts each feature promotes per unit of activation
    max_abs_error: float  # max |Σ parts − the router's own logits|: the decomposition's check
    logit_scale: float  # max |router logit|, to judge max_abs_error against


@dataclass
class MapPass:
    """One pass of a dictionary over held-out text at one MoE layer; T kept tokens."""

    latents: torch.Tensor  # [T, F]
    experts: torch.Tensor  # [T, K] experts chosen at the layer
    tokens: torch.Tensor  # [T] token ids
    prev_tokens: torch.Tensor  # [T] the previous token's id (-1 at a context start)
    where: torch.Tensor  # [T, 2] (context, position)
    contexts: torch.Tensor  # [contexts, S] token ids
    attribution: RouterAttribution | None = None  # SAEs on the router's input
    composition: tuple[torch.Tensor, torch.Tensor] | None = None  # block transcoders: (num, den) sums


@torch.no_grad()
def collect_for_map(handle: ModelHandle, coder: Coder, sources: list[Site], layer: int, batches: list,
                    attribution: bool, composition: bool = False, progress: bool = False) -> MapPass:
    """One pass: latents, chosen experts and router logits at `layer`, token ids, previous ids,
    (context, position) of every kept token, and the attribution parts when asked."""
    routing_site, logits_site = Site("routing", layer), Site("router_logits", layer)
    pairs = {"src": (sources, sources[:1]), routing_site: (routing_site, routing_site)}
    if attribution:
        pairs[logits_site] = (logits_site, logits_site)
    W_r, b_r = router_linear(handle, layer) if attribution else (None, None)
    out: dict[str, list] = defaultdict(list)
    comp_num = comp_den = virtual = None
    max_err, scale = 0.0, 0.0
    ctx = 0
    dev = coder.b_dec.device
    moe = handle.moe_layers[layer]
    decoder = coder.folded().W_dec.detach() if composition else None  # fold once, not per batch
    from deepseemoe.progress import track

    for packed in track(batches, "mapping", disable=not progress, unit="batches"):
        hooks, seen = [], {}
        if composition:  # the weighted outputs w_k·E_k(x) of the chosen experts
            def cb(ev, seen=seen):
                seen["contrib"] = (moe.adapter.expert_outputs(moe, ev.x, ev.idx) * ev.weights[..., None]).float()
            hooks = moe.adapter.observe(moe, cb)
        try:
            item = next(model_stream(handle, [packed], pairs, device=dev))
        finally:
            for h in hooks:
                h.remove()
        x = item["src"][0].float()
        lat = coder.encode(x)
        experts = item[routing_site][0].long()
        out["latents"].append(lat.cpu())
        out["experts"].append(experts.cpu())
        ids = packed.input_ids
        keep = packed.keep
        flat = ids.reshape(-1)
        prev = torch.cat([torch.full((ids.shape[0], 1), -1, dtype=ids.dtype), ids[:, :-1]], 1).reshape(-1)
        out["tokens"].append(flat[keep])
        out["prev_tokens"].append(prev[keep])
        pos = keep.nonzero().squeeze(1)
        out["where"].append(torch.stack([pos // ids.shape[1] + ctx, pos % ids.shape[1]], 1))
        if composition:  # accumulate, never keep [T, K, D]
            num, den = composition_sums(lat, decoder, experts, seen["contrib"][keep.to(seen["contrib"].device)],
                                        moe.num_experts)
            comp_num = num if comp_num is None else num + comp_num
            comp_den = den if comp_den is None else den + comp_den
        out["contexts"].append(ids)
        ctx += ids.shape[0]
        if attribution:
            parts = router_attribution(coder, x, W_r.to(dev).float(), None if b_r is None else b_r.to(dev).float())
            logits = item[logits_site][0].float()
            max_err = max(max_err, float((parts["total"] - logits).abs().max()))
            scale = max(scale, float(logits.abs().max()))
            out["attr_features"].append(parts["features"].cpu())
            out["attr_error"].append(parts["error"].cpu())
            virtual = parts["virtual"].cpu()
    cat = {k: torch.cat(v) for k, v in out.items()}
    return MapPass(cat["latents"], cat["experts"], cat["tokens"], cat["prev_tokens"], cat["where"], cat["contexts"],
                   RouterAttribution(cat["attr_features"], cat["attr_error"], virtual, max_err, scale)
                   if attribution else None,
                   (comp_num, comp_den) if composition else None)


def quantile_picks(values: torch.Tensor, bins: int, per_bin: int, seed: int = 0) -> list[list[int]]:
    """Indices of up to `per_bin` random positive entries of `values` from each of `bins`
    equal-count bins of its positive values, lowest bin first (delphi's quantile sampling)."""
    pos = (values > 0).nonzero().squeeze(1)
    if len(pos) == 0:
        return [[] for _ in range(bins)]
    order = pos[values[pos].argsort()]
    g = torch.Generator().manual_seed(seed)
    picks = []
    for chunk in torch.tensor_split(order, bins):
        take = torch.randperm(len(chunk), generator=g)[:per_bin]
        picks.append(chunk[take].tolist())
    return picks


def top_examples(latents: torch.Tensor, where: torch.Tensor, contexts: torch.Tensor, idx: torch.Tensor,
                 tokenizer, n: int = 5, window: int = 8, features: list[int] | None = None,
                 quantile_bins: int = 4) -> dict[int, dict[str, list]]:
    """Per feature, the n strongest activations and n per activation-quantile bin, each with a
    token window and the token's experts. The windows of all features are decoded in one batch
    (every live feature keeps examples: a described or searched feature must have some)."""
    picks: list[tuple[int, str, int, float]] = []  # feature, "top" or its quantile bin, token, activation
    feats = features if features is not None else range(latents.shape[1])
    for f in feats:
        col = latents[:, f]
        active = int((col > 0).sum())
        if not active:
            continue
        picks += [(f, "top", t, float(col[t])) for t in col.topk(min(n, active)).indices.tolist()]
        for b, ts in enumerate(quantile_picks(col, quantile_bins, n, seed=f)):
            picks += [(f, str(b), t, float(col[t])) for t in ts]
    windows = []
    for _, _, t, _ in picks:
        c, p = where[t].tolist()
        windows.append(contexts[c, max(0, p - window):p + 1].tolist())
    if tokenizer is not None:
        texts = tokenizer.batch_decode([w[:-1] for w in windows])
        tokens = tokenizer.batch_decode([w[-1:] for w in windows])
    else:
        texts, tokens = [str(w[:-1]) for w in windows], [str(w[-1]) for w in windows]
    result: dict[int, dict[str, list]] = {}
    for (f, kind, t, a), text, token in zip(picks, texts, tokens, strict=True):
        entry = result.setdefault(f, {"top": [], "quantiles": [[] for _ in range(quantile_bins)]})
        shown = {"activation": a, "experts": idx[t].tolist(), "text": text, "token": token}
        (entry["top"] if kind == "top" else entry["quantiles"][int(kind)]).append(shown)
    return result


def expert_composition(latents: torch.Tensor, W_dec: torch.Tensor, idx: torch.Tensor, contrib: torch.Tensor,
                       num_experts: int) -> dict[str, np.ndarray]:
    """Which features write each expert's share of a block transcoder's output.

    latents [T, F], W_dec [F, D] (scales folded), idx [T, K] chosen experts, contrib [T, K, D] the
    weighted outputs w_k·E_k(x) of those experts. For feature i and expert e:
        S[i, e] = Σ_{t,k: idx=e} f_i(t)·⟨d_i, c_k(t)⟩ / Σ_{t,k: idx=e} ‖c_k(t)‖²
    — the part of expert e's output (in its own squared norm) that feature i writes along it.
    A feature's expert profile |S[i, :]| normalised gives its specificity 1 − H/log E (1: it writes
    into one expert's output only)."""
    return composition_from_sums(*composition_sums(latents, W_dec, idx, contrib, num_experts))


def composition_sums(latents: torch.Tensor, W_dec: torch.Tensor, idx: torch.Tensor, contrib: torch.Tensor,
                     num_experts: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The numerator [E, F] and denominator [E] of S, in token chunks (memory [chunk, K, F])."""
    F = latents.shape[1]
    num = torch.zeros(num_experts, F, dtype=torch.float64)
    den = torch.zeros(num_experts, dtype=torch.float64)
    W = W_dec.float().to(contrib.device)
    for a in range(0, len(idx), chunk):
        lat, ix, c = latents[a:a + chunk].float().to(W.device), idx[a:a + chunk], contrib[a:a + chunk].float()
        proj = torch.einsum("fd,tkd->tkf", W, c) * lat[:, None, :]  # [t, K, F]
        flat = ix.reshape(-1).long().cpu()
        num.index_add_(0, flat, proj.reshape(-1, F).double().cpu())
        den.index_add_(0, flat, c.pow(2).sum(-1).reshape(-1).double().cpu())
    return num, den


def composition_from_sums(num: torch.Tensor, den: torch.Tensor) -> dict[str, np.ndarray]:
    num_experts = len(den)
    S = (num / den.clamp_min(1e-30)[:, None]).T.numpy()  # [F, E]
    mag = np.abs(S)
    total = mag.sum(1, keepdims=True)
    h = entropy(mag, axis=1)
    spec = np.where(total[:, 0] > 0, 1 - h / math.log(num_experts), np.nan)
    return {"share": S, "specificity": spec, "top_expert": mag.argmax(1)}
