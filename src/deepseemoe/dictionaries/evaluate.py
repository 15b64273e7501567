"""`deepseemoe evaluate RUN_DIR`: how good are the trained dictionaries, on text they did not see.

Per coder, over the evaluation tokens (BOS and padding excluded everywhere):
- fvu: Σ‖y − ŷ‖² / Σ‖y − ȳ‖² per target site, ȳ the mean over all evaluation tokens, averaged
  over the coder's sites (the training loss uses the same definition per batch);
- l0 (mean active latents per token), dead (never fired) and dense (fired on > 10 % of tokens);
- spliced next-token loss: the model runs with the target site replaced by the reconstruction
  (SAE: its site — decoder-layer input/output, MoE block input/output; block transcoder: MoE
  block output; CLT: every block
  output, each from the latents of its layer and the layers before), against the clean model:
  ce_clean, ce_spliced, delta_ce, kl (clean ‖ spliced, nats per token), and loss_recovered =
  (ce_zero − ce_spliced) / (ce_zero − ce_clean) with the site zero-ablated;
- MoE: routing_preserved — mean top-k set overlap, |clean ∩ spliced| / k, at every MoE layer after
  the spliced site; for a router transcoder, the top-k of its reconstructed logits against the
  router's own; per_expert_fvu of block transcoders: tokens grouped by their top-1 expert, each
  group's FVU against its own mean.
A crosscoder reads several layers at once and cannot be spliced into one forward: FVU etc. only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepseemoe.capture.core import Site
from deepseemoe.data.tokens import counted_predictions
from deepseemoe.dictionaries.coder import Coder
from deepseemoe.dictionaries.stream import model_stream
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.interventions.sites import REWRITABLE, rewrite_site, routing_hooks, watch_routing
from deepseemoe.models.handle import ModelHandle

DENSE_FRACTION = 0.10
SPLICEABLE_SAE_SITES = REWRITABLE
SPLICED_KINDS = ("sae", "transcoder", "skip_transcoder", "clt")  # a crosscoder reads later layers: not causal


class _Splice:
    """Hooks that replace a coder's target site(s) with its reconstruction (or zeros), on the kept
    tokens only; `routing` collects the experts chosen at MoE layers after the site."""

    def __init__(self, handle: ModelHandle, coder: Coder, meta: dict, keep: torch.Tensor, mode: str):
        self.handle, self.coder, self.meta, self.keep, self.mode = handle, coder, meta, keep, mode
        self.hooks: list = []
        self.latents: dict[int, torch.Tensor] = {}
        self.routing: dict[int, list[torch.Tensor]] = {}
        self.source = [Site(k, layer) for k, layer in meta["source"]]
        self.target = [Site(k, layer) for k, layer in meta["target"]]

    def _rewrite(self, flat: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        new = flat.clone()
        k = self.keep.to(flat.device)
        new[k] = (torch.zeros_like(recon) if self.mode == "zero" else recon).to(flat.dtype)[k]
        return new

    def install(self) -> None:
        c, kind = self.coder, self.meta["kind"]
        dev = c.b_dec.device
        if kind == "sae":
            site = self.target[0]
            if site.kind not in SPLICEABLE_SAE_SITES:
                raise DeepSeeMoEError(f"splicing an SAE on {site.kind} is not supported; "
                                      f"spliceable sites: {', '.join(SPLICEABLE_SAE_SITES)}")

            def swap(h: torch.Tensor) -> torch.Tensor:
                flat = h.reshape(-1, h.shape[-1])
                recon = c(flat.to(dev, torch.float32)).out.to(flat.device)
                return self._rewrite(flat, recon).view_as(h)

            self.hooks.append(rewrite_site(self.handle, site, swap))
        elif kind in ("transcoder", "skip_transcoder", "clt"):
            S = len(self.source)
            D = c.cfg.d_in // S
            width_out = c.cfg.out_dim // S
            for i, site in enumerate(self.source):
                def pre(module, args, kwargs, i=i):
                    x = args[0] if args else kwargs["hidden_states"]
                    self.latents[i] = x.reshape(-1, x.shape[-1]).to(dev, torch.float32)
                self.hooks.append(self.handle.site_module(site).register_forward_pre_hook(pre, with_kwargs=True))
            for j, site in enumerate(self.target):
                def replace(h: torch.Tensor, j=j) -> torch.Tensor:
                    flat = h.reshape(-1, h.shape[-1])
                    if S == 1:
                        recon = c(self.latents[0]).out
                    else:  # CLT: the source layers seen so far, the rest zero (they only write to later layers)
                        x = torch.zeros(flat.shape[0], S * D, device=dev)
                        for i in range(j + 1):
                            x[:, i * D:(i + 1) * D] = self.latents[i]
                        recon = c(x).out[:, j * width_out:(j + 1) * width_out]
                    return self._rewrite(flat, recon.to(flat.device)).view_as(h)
                self.hooks.append(rewrite_site(self.handle, site, replace))
        else:
            raise DeepSeeMoEError(f"a {kind} cannot be spliced into one forward")
        after = max(s.layer for s in self.target)
        self.hooks += routing_hooks(self.handle, [la for la in sorted(self.handle.moe_layers) if la > after],
                                    self.routing)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def _topk_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T, K] × [T, K] expert ids → [T] |a ∩ b| / K."""
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean(-1)


def _next_token_stats(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                      clean_logp: torch.Tensor | None = None) -> tuple[float, float, int, torch.Tensor]:
    """Σ CE and Σ KL(clean ‖ this) over the predictions `valid` [B, S-1] counts (`data.tokens.
    counted_predictions`: both tokens real and of one document, as the causal checks' loss meter
    counts them); their count; and the CE of each of those positions [n] (float64)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    kl = 0.0
    if clean_logp is not None:
        kl = float((clean_logp.exp() * (clean_logp - logp)).sum(-1)[valid].sum())
    return float(ce[valid].sum()), kl, int(valid.sum()), ce[valid].double()


def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float, zero_diff_sq: float, n: int) -> float | None:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 for a perfect splice, 0 for one no better than
    zeros. None when the denominator is noise: the mean per-prediction change CE_zero − CE_clean is
    within two standard errors of 0 (`zero_diff_sq` = Σ of its squares over the `n` predictions), as
    when zero-ablating the site hardly matters (a −1.4 from a denominator of −0.0016 is no number)."""
    d = ce_zero - ce_clean
    if d == 0:
        return None
    if ce_spliced == ce_zero:  # the splice *is* zero ablation: it recovers nothing, whatever the noise
        return 0.0
    se = max(zero_diff_sq / n - d * d, 0.0) ** 0.5 / max(n - 1, 1) ** 0.5
    if n < 2 or abs(d) < 2 * se:
        return None
    return (ce_zero - ce_spliced) / d


@dataclass
class _Totals:
    """Running sums of one coder over the evaluation tokens (each becomes one figure of evaluation.json)."""

    sq_err: list[float]  # per site: Σ‖y − ŷ‖²
    sq: list[float]  # per site: Σ‖y‖²
    sums: list[torch.Tensor | None]  # per site: Σ y [D_site] (float64)
    tokens: int = 0
    active: float = 0.0  # Σ L0
    fires: torch.Tensor | None = None  # [F] tokens each latent fired on
    topk_agree: float | None = None  # router transcoders: Σ top-k overlap of predicted and true logits
    expert_sq_err: dict[int, float] = field(default_factory=dict)  # block transcoders, by top-1 expert
    expert_targets: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    next_tokens: int = 0  # predictions measured with the splice
    ce_clean: float = 0.0
    ce_recon: float = 0.0
    ce_zero: float = 0.0
    zero_diff_sq: float = 0.0  # Σ over predictions of (CE_zero − CE_clean)², for the noise of CE_zero − CE_clean
    kl: float = 0.0
    routing_overlap: float = 0.0  # Σ top-k overlap of later MoE layers, spliced vs clean
    routing_tokens: int = 0

    @classmethod
    def for_coder(cls, coder: Coder) -> _Totals:
        S = coder.cfg.n_sites
        return cls([0.0] * S, [0.0] * S, [None] * S)

    def spliced_loss(self) -> dict[str, float]:
        """Per counted prediction: CE of the clean and the spliced model, their difference, KL."""
        n = max(self.next_tokens, 1)
        ce_c, ce_r = self.ce_clean / n, self.ce_recon / n
        return {"ce_clean": ce_c, "ce_spliced": ce_r, "delta_ce": ce_r - ce_c, "kl": self.kl / n}


def _spliceable(meta: dict) -> bool:
    """A coder whose reconstruction can stand in for its site in the model's own forward."""
    return meta["kind"] in SPLICED_KINDS and (meta["kind"] != "sae" or meta["target"][0][0] in SPLICEABLE_SAE_SITES)


@torch.no_grad()
def evaluate_run(run_dir: str | Path, *, data: str | None = None, tokens: int = 20_000, batch_size: int = 8,
                 device: str | None = None, progress: bool = True, trust_remote_code: bool = False,
                 device_map: str | None = None, benchmarks: bool = True,
                 together: dict[str, list[str]] | None = None) -> dict:
    """Reconstruction, splice and routing measures of every coder of a run on `tokens` of `data`;
    with `benchmarks`, also the SAEBench family (sparse probing, absorption) beside an untrained
    dictionary of each shape (an internal evaluation that reads only FVU/ΔCE skips them).
    `together`: named groups of coders (say, one SAE per layer) also spliced all at once, in one
    forward — the replacement model of the group — under the doc's "together"."""
    from deepseemoe.dictionaries.trained import TrainedRun
    from deepseemoe.progress import track

    trained = TrainedRun.open(run_dir, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
    run_dir, spec, coder_device = trained.path, trained.spec, trained.coder_device
    handle = trained.model()
    coders: dict[str, tuple[Coder, dict]] = {name: (coder, record.meta)
                                             for name, (coder, record) in trained.coders().items()}
    if not coders:
        raise DeepSeeMoEError(f"{run_dir}/dictionaries holds no trained coders; run `deepseemoe train` first")

    for group, names in (together or {}).items():
        bad = [n for n in names if n not in coders or not _spliceable(coders[n][1])]
        if bad or not names:
            raise DeepSeeMoEError(f"cannot splice {group!r} at once: {', '.join(bad) or 'no coders'} — not a "
                                  f"spliceable coder of {run_dir}")
    joint = {group: _Totals([], [], []) for group in together or {}}  # a group: its spliced-loss sums only
    batches = trained.batches(data=data, batch_size=batch_size, tokens=tokens)
    pairs = {name: ([Site(k, la) for k, la in m["source"]], [Site(k, la) for k, la in m["target"]])
             for name, (_, m) in coders.items()}
    # block transcoders: their layer's routing too, for the FVU per top-1 expert
    extra_routing = {name: Site("routing", m["layers"][0]) for name, (_, m) in coders.items()
                     if m["kind"] in ("transcoder", "skip_transcoder") and m["layers"][0] in handle.moe_layers}
    acc = {name: _Totals.for_coder(coder) for name, (coder, _) in coders.items()}
    # sparse probing's baseline: a dictionary of the same shape, untrained (seeded)
    from deepseemoe.dictionaries.coder import build_coder
    from deepseemoe.dictionaries.probing import SegmentPool

    randoms = {}
    for name, (coder, _) in coders.items() if benchmarks else ():
        torch.manual_seed(0)
        randoms[name] = build_coder(coder.cfg, device=coder_device).eval()
    pools = {name: SegmentPool() for name in coders} if benchmarks else None
    # expert alignment: the features of a dictionary whose input feeds an MoE layer against that layer's routing
    from deepseemoe.dictionaries.alignment import AlignmentCounts
    from deepseemoe.models.handle import fed_moe_layer

    aligned = {}
    for name, (coder, m) in coders.items() if benchmarks else ():
        layer = fed_moe_layer(Site(*m["source"][0]), handle.moe_layers)
        if layer is not None:
            moe = handle.moe_layers[layer]
            aligned[name] = (Site("routing", layer), AlignmentCounts(coder.cfg.n_latents, moe.num_experts, moe.top_k))
    # feature absorption (first-letter task): for dictionaries that reconstruct what they read, the word
    # tokens' inputs and codes (the trained and the random dictionary's), up to ABSORPTION_TOKENS of them
    from deepseemoe.data.token_text import token_texts
    from deepseemoe.dictionaries.absorption import first_letters

    absorb = {name: {"x": [], "latents": [], "random": [], "tokens": []} for name, (_, m) in coders.items()
              if benchmarks and m["kind"] == "sae" and m["source"] == m["target"] and len(m["source"]) == 1}
    letters, is_word = {}, None
    if absorb:
        tok = handle.require_tokenizer()
        vocab = list(range(len(tok)))
        letters = first_letters(dict(zip(vocab, token_texts(tok, vocab), strict=True)))
        is_word = torch.zeros(len(tok), dtype=torch.bool)  # token id -> a word with a known first letter
        is_word[list(letters)] = True
    model_device = next(handle.model.parameters()).device
    for packed in track(batches, "evaluating", disable=not progress, unit="batches"):
        ids, am = packed.input_ids.to(model_device), packed.attention_mask.to(model_device)
        keep = packed.keep.to(model_device)
        # reconstruction quality on the kept tokens, one forward for all coders
        routing_sites = {*extra_routing.values(), *(site for site, _ in aligned.values())}
        items = next(model_stream(handle, [packed], {**pairs, **{s: (s, s) for s in routing_sites}},
                                  device=coder_device))
        if benchmarks:  # each kept token's document and context row (its probing segment), and token id
            B, S = packed.doc.shape
            docs, rows = packed.doc.reshape(-1)[packed.keep], torch.arange(B).repeat_interleave(S)[packed.keep]
            kept_ids = packed.input_ids.reshape(-1)[packed.keep.cpu()]
            kept_domains = [packed.domains.get(d) or "none" for d in docs.tolist()]
        for name, (coder, meta) in coders.items():
            x, y = items[name]
            out = coder(x.float())
            a = acc[name]
            for b_i, b in enumerate(coder.site_slices()):
                a.sq_err[b_i] += float((y[:, b] - out.out[:, b]).pow(2).sum())
                a.sq[b_i] += float(y[:, b].double().pow(2).sum())
                if a.sums[b_i] is None:
                    a.sums[b_i] = torch.zeros(b.stop - b.start, dtype=torch.float64)
                a.sums[b_i] += y[:, b].double().sum(0).cpu()
            a.tokens += y.shape[0]
            lat = out.latents
            if benchmarks:  # the untrained dictionary's codes of the same tokens, encoded once for both measures
                xf = x.float()
                random_lat = randoms[name].encode(xf)
                pools[name].add(docs, rows, packed.domains, latents=lat, raw=xf, random=random_lat)
                if name in aligned:
                    site, counts = aligned[name]
                    counts.add(lat, random_lat, items[site][0], kept_domains)
                if name in absorb and sum(len(t) for t in absorb[name]["tokens"]) < ABSORPTION_TOKENS:
                    _collect_words(absorb[name], kept_ids, is_word[kept_ids], xf, lat, random_lat)
            a.active += float((lat > 0).sum())
            if a.fires is None:
                a.fires = torch.zeros(lat.shape[1], dtype=torch.float64)
            a.fires += (lat > 0).sum(0).double().cpu()
            if meta["target"][0][0] == "router_logits":
                k = handle.moe_layers[meta["layers"][0]].top_k
                a.topk_agree = (a.topk_agree or 0.0) + float(_topk_overlap(y.topk(k).indices,
                                                                           out.out.topk(k).indices).sum())
            if name in extra_routing:
                top1 = items[extra_routing[name]][0][:, 0].long().cpu()
                err = (y - out.out).pow(2).sum(1).double().cpu()
                for e in top1.unique().tolist():
                    sel = top1 == e
                    a.expert_sq_err[e] = a.expert_sq_err.get(e, 0.0) + float(err[sel].sum())
                    a.expert_targets.setdefault(e, []).append(y[sel.to(y.device)].double().cpu())
        # spliced loss
        with watch_routing(handle) as clean_routing:
            clean_logits = handle.model(input_ids=ids, attention_mask=am, use_cache=False).logits
        clean_logp = torch.log_softmax(clean_logits[:, :-1].float(), -1)
        counted = counted_predictions(packed).to(model_device)
        ce, _, n, ce_tokens = _next_token_stats(clean_logits, ids, counted)
        for group, names in (together or {}).items():
            splices = [_Splice(handle, coders[n][0], coders[n][1], keep, "recon") for n in names]
            try:
                for sp in splices:
                    sp.install()
                logits = handle.model(input_ids=ids, attention_mask=am, use_cache=False).logits
            finally:
                for sp in splices:
                    sp.remove()
            ce_s, kl_s, _, _ = _next_token_stats(logits, ids, counted, clean_logp)
            j = joint[group]
            j.ce_clean, j.ce_recon, j.kl, j.next_tokens = j.ce_clean + ce, j.ce_recon + ce_s, j.kl + kl_s, j.next_tokens + n
        for name, (coder, meta) in coders.items():
            a = acc[name]
            if not _spliceable(meta):
                continue
            a.ce_clean += ce
            a.next_tokens += n
            for mode in ("recon", "zero"):
                splice = _Splice(handle, coder, meta, keep, mode)
                splice.install()
                try:
                    logits = handle.model(input_ids=ids, attention_mask=am, use_cache=False).logits
                finally:
                    splice.remove()
                ce_s, kl_s, _, ce_s_tokens = _next_token_stats(logits, ids, counted,
                                                                clean_logp if mode == "recon" else None)
                if mode == "zero":
                    a.ce_zero += ce_s
                    diff = ce_s_tokens - ce_tokens
                    a.zero_diff_sq += float(diff.pow(2).sum())
                    continue
                a.ce_recon += ce_s
                a.kl += kl_s
                for layer, calls in splice.routing.items():
                    idx = calls[-1]
                    k_mask = keep.to(idx.device)
                    a.routing_overlap += float(_topk_overlap(clean_routing[layer][-1][k_mask], idx[k_mask]).sum())
                    a.routing_tokens += int(k_mask.sum())
    from scipy import sparse

    from deepseemoe.dictionaries.absorption import absorption

    absorbed = {}
    for name, ab in absorb.items():
        if not ab["tokens"]:
            continue
        xs, toks = np.concatenate(ab["x"]), np.concatenate(ab["tokens"])
        absorbed[name] = {"trained": absorption(xs, sparse.vstack(ab["latents"]), _decoder(coders[name][0]), toks, letters),
                          "random": absorption(xs, sparse.vstack(ab["random"]), _decoder(randoms[name]), toks, letters)}
    alignment = {name: {"layer": site.layer, **counts.result()} for name, (site, counts) in aligned.items()}
    doc = _summarise(run_dir, coders, acc, data or spec.data, sum(b.num_tokens for b in batches), pools, absorbed,
                     alignment)
    if together:
        doc["together"] = {group: {"coders": together[group], "next_tokens": j.next_tokens, **j.spliced_loss()}
                           for group, j in joint.items()}
    return doc


ABSORPTION_TOKENS = 8192  # word tokens kept per dictionary for the first-letter task


def _collect_words(ab: dict, kept_ids: torch.Tensor, words: torch.Tensor, x: torch.Tensor, lat: torch.Tensor,
                   random_lat: torch.Tensor) -> None:
    """The batch's word tokens (`words`: a first letter known): their ids, inputs, codes and the random
    dictionary's codes, appended to `ab`; nothing for a batch without one."""
    if not words.any():
        return
    ab["tokens"].append(kept_ids[words].numpy())
    ab["x"].append(x[words.to(x.device)].cpu().numpy())
    ab["latents"].append(_sparse(lat[words.to(lat.device)]))
    ab["random"].append(_sparse(random_lat[words.to(random_lat.device)]))


def _sparse(latents: torch.Tensor):
    """[n, F] codes as a scipy CSR matrix (a k-sparse code holds a few latents per row)."""
    from scipy import sparse

    nz = latents.nonzero()
    values = latents[nz[:, 0], nz[:, 1]].float().cpu().numpy()
    return sparse.csr_matrix((values, (nz[:, 0].cpu().numpy(), nz[:, 1].cpu().numpy())), shape=tuple(latents.shape))


def _decoder(coder: Coder) -> np.ndarray:
    """[F, D] decoder rows of a single-site dictionary."""
    return coder.W_dec.detach().float().cpu().numpy()


def _summarise(run_dir: Path, coders: dict, acc: dict[str, _Totals], data: str, n_tokens: int,
               pools: dict | None = None, absorbed: dict | None = None, alignment: dict | None = None) -> dict:
    from deepseemoe.dictionaries.probing import sparse_probing
    from deepseemoe.dictionaries.spread import layer_spread

    results = {}
    for name, (coder, meta) in coders.items():
        a = acc[name]
        n = a.tokens
        fvus = []
        for b_i in range(coder.cfg.n_sites):
            var = a.sq[b_i] - float(a.sums[b_i].pow(2).sum()) / n
            fvus.append(a.sq_err[b_i] / max(var, 1e-30))
        fires = a.fires / n
        r = {"kind": meta["kind"], "layers": meta["layers"], "activation": coder.cfg.activation,
             "n_latents": coder.cfg.n_latents, "tokens": int(n), "fvu": sum(fvus) / len(fvus),
             "fvu_per_site": fvus, "l0": a.active / n, "dead": float((fires == 0).double().mean()),
             "dense": float((fires > DENSE_FRACTION).double().mean())}
        if a.next_tokens:
            loss = a.spliced_loss()
            ce_c, ce_r, ce_z = loss["ce_clean"], loss["ce_spliced"], a.ce_zero / a.next_tokens
            r.update(loss, ce_zero=ce_z)
            recovered = loss_recovered(ce_c, ce_r, ce_z, a.zero_diff_sq, a.next_tokens)
            if recovered is None:
                r["loss_recovered_note"] = (f"undefined: zero-ablating the site changes CE by {ce_z - ce_c:+.2g} "
                                            "nats/token, within two standard errors of no change")
            else:
                r["loss_recovered"] = recovered
            if a.routing_tokens:
                r["routing_preserved"] = a.routing_overlap / a.routing_tokens
        if a.topk_agree is not None:
            r["routing_preserved"] = a.topk_agree / n
        if a.expert_sq_err:
            per = {}
            for e, res in sorted(a.expert_sq_err.items()):
                y = torch.cat(a.expert_targets[e])
                var = float((y - y.mean(0)).pow(2).sum())
                per[str(e)] = res / var if var > 0 and len(y) > 1 else float("nan")
            r["per_expert_fvu"] = per
        if pools is not None:  # the documents' domains as labels (module docstring of dictionaries.probing)
            lat, labels, docs = pools[name].means("latents")
            if len(labels):
                r["sparse_probing"] = sparse_probing(lat, pools[name].means("raw")[0], labels, docs,
                                                     random_latents=pools[name].means("random")[0])
            else:
                r["sparse_probing"] = {"note": "the evaluation text has no domain labels to probe for"}
        spread = layer_spread(coder, (a.fires > 0).numpy())  # cross-layer kinds: the layers each live feature writes to
        if spread is not None:
            r["layer_spread"] = spread
        if absorbed and name in absorbed:  # beside an untrained dictionary of the same shape
            r["absorption"] = absorbed[name]
        if alignment and name in alignment:  # beside the untrained dictionary and shuffled routing
            r["expert_alignment"] = alignment[name]
        results[name] = r
    doc = {"data": data, "tokens": n_tokens,
           "fvu_normalisation": "per site: sum of squared error / sum of squared deviation from the mean over "
                                "the evaluation tokens; averaged over sites", "coders": results}
    return doc
