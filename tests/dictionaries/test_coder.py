"""Sparse coders against references written here in plain torch, on tiny cases."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder, build_coder
from deepseemoe.dictionaries.losses import auxk_loss, fvu, site_fvu, sparsity_penalty

torch.manual_seed(0)


def _coder(activation, d_out=None, skip=False, k=3, F=12, D=5):
    coder = SparseCoder(CoderConfig(d_in=D, d_out=d_out, n_latents=F, activation=activation, k=k, skip=skip),
                        dtype=torch.float64)
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.5)
    return coder


def _reference(coder, x):
    """The documented math, written out independently."""
    W_enc, b_enc, W_dec, b_dec = coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec
    pre = (x - (0 if coder.cfg.is_transcoder else b_dec)) @ W_enc + b_enc
    act = coder.cfg.activation
    if act == "relu":
        lat = pre.clamp_min(0)
    elif act == "jumprelu":
        lat = torch.where(pre > coder.log_threshold.exp(), pre, torch.zeros_like(pre))
    elif act == "topk":
        lat = torch.zeros_like(pre)
        r = pre.clamp_min(0)
        for t in range(len(x)):
            order = sorted(range(pre.shape[1]), key=lambda i: -float(r[t, i]))[: coder.cfg.k]
            for i in order:
                lat[t, i] = r[t, i]
    else:  # batchtopk, training mode: the k·T largest over the batch
        r = pre.clamp_min(0)
        cutoff = r.flatten().sort(descending=True).values[coder.cfg.k * len(x) - 1]
        lat = torch.where(r >= cutoff, r, torch.zeros_like(r))
    out = lat @ W_dec + b_dec
    if coder.W_skip is not None:
        out = out + x @ coder.W_skip.T
    return out, lat


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder", "router_transcoder"])
def test_forward_matches_reference(activation, kind):
    d_out = {"sae": None, "transcoder": 5, "skip_transcoder": 5, "router_transcoder": 8}[kind]
    coder = _coder(activation, d_out=d_out, skip=kind == "skip_transcoder")
    coder.train()
    x = torch.randn(7, 5, dtype=torch.float64)
    out = coder(x)
    ref_out, ref_lat = _reference(coder, x)
    torch.testing.assert_close(out.latents, ref_lat)
    torch.testing.assert_close(out.out, ref_out)


@pytest.mark.parametrize("backend", ["csr", "index_add"])
@pytest.mark.parametrize(("activation", "kind"), [("topk", "skip_transcoder"), ("topk", "sae"),
                                                  ("relu", "skip_transcoder"), ("jumprelu", "skip_transcoder")])
def test_gradients_match_autograd_of_reference(activation, kind, backend, monkeypatch):
    """Also covers both sparse backward kernels of the TopK fast path (the SAE case sends gradient
    through the encoder input into b_dec)."""
    import deepseemoe.dictionaries.coder as coder_module

    monkeypatch.setattr(coder_module, "_csr_backward", lambda device: backend == "csr")
    sae = kind == "sae"
    coder = _coder(activation, d_out=None if sae else 4, skip=not sae)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = x if sae else torch.randn(6, 4, dtype=torch.float64)
    params = [coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec] + ([] if sae else [coder.W_skip])
    loss = fvu(y, coder(x).out)
    grads = torch.autograd.grad(loss, params)
    ref_out, _ = _reference(coder, x)
    ref_loss = ((y - ref_out) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    ref_grads = torch.autograd.grad(ref_loss, params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel():
    coder = _coder("jumprelu", F=4, D=3)
    with torch.no_grad():
        coder.log_threshold.fill_(0.0)  # θ = 1
    pre = torch.tensor([[1.0004, 0.5, 1.2, 0.9996]], dtype=torch.float64)
    coder.cfg.jumprelu_bandwidth = 0.001
    out = coder.activate(pre)
    # d/dθ Σ pre·H(pre−θ) = −θ·K(pre−θ)/ε for |pre−θ| < ε/2, so latents 0 and 3 get −1/ε·1
    (g,) = torch.autograd.grad(out.sum(), coder.log_threshold)
    expected = torch.tensor([-1 / 0.001, 0.0, 0.0, -1 / 0.001], dtype=torch.float64) * 1.0  # × dθ/dlogθ = θ = 1
    torch.testing.assert_close(g, expected)


def test_fvu_and_penalties_by_hand():
    y = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    yhat = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    # residual² = 0 + 1 + 1 + 0 = 2; variance: mean (2, 1) → 1 + 1 + 1 + 1 = 4
    assert float(fvu(y, yhat)) == pytest.approx(0.5)
    coder = _coder("relu", F=3, D=2)
    out = coder(torch.randn(4, 2, dtype=torch.float64))
    ref = (out.latents * coder.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(sparsity_penalty(coder, out), ref)


def test_auxk_uses_only_dead_latents():
    coder = _coder("topk", d_out=3, F=6, D=3, k=2)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    out = coder(x)
    dead = torch.tensor([True, False, True, False, False, True])
    loss = auxk_loss(coder, y, out, dead, k_aux=2)
    (g,) = torch.autograd.grad(loss, coder.W_enc)
    assert g[:, ~dead].abs().max() == 0 and g[:, dead].abs().max() > 0
    # reference: the two largest relu'd pre-activations among dead latents reconstruct the residual
    pre = (x @ coder.W_enc + coder.b_enc).clamp_min(0).masked_fill(~dead, 0.0)
    v, i = pre.topk(2, dim=-1)
    resid = (y - out.out).detach()
    recon = torch.zeros_like(pre).scatter(-1, i, v) @ coder.W_dec
    torch.testing.assert_close(loss, ((resid - recon) ** 2).sum() / ((resid - resid.mean(0)) ** 2).sum())
    assert float(auxk_loss(coder, y, out, torch.zeros(6, dtype=torch.bool), 2)) == 0.0


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_folding_scales_into_weights_preserves_outputs(kind):
    coder = _coder("topk", d_out=None if kind == "sae" else 5, skip=kind == "skip_transcoder")
    coder.input_scale.fill_(0.25)
    coder.target_scale.fill_(0.25 if kind == "sae" else 2.0)
    x = torch.randn(6, 5, dtype=torch.float64)
    folded = coder.folded()
    assert bool((folded.input_scale == 1).all()) and bool((folded.target_scale == 1).all())
    torch.testing.assert_close(folded(x).out, coder(x).out)
    torch.testing.assert_close(folded(x).latents, coder(x).latents)


def test_batchtopk_threshold_turns_into_jumprelu_at_inference():
    coder = _coder("batchtopk", F=6, D=4, k=2)
    x = torch.randn(32, 4, dtype=torch.float64)
    coder.train()
    coder.update_batchtopk_threshold(coder(x).latents, momentum=0.0)
    coder.eval()
    lat = coder.encode(x)
    r = coder.pre_activations(x).clamp_min(0)
    torch.testing.assert_close(lat, torch.where(r > coder.threshold, r, torch.zeros_like(r)))


def _clt(activation, S=3, D=4, Fl=5, k=2):
    cfg = CoderConfig(d_in=S * D, d_out=S * D, n_latents=S * Fl, activation=activation, k=k, n_sites=S,
                      cross_layer=True)
    clt = build_coder(cfg, dtype=torch.float64)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.5)
    return clt


def _clt_reference(clt, x):
    """Layer by layer: latents of layer i from x_i alone (top-k within the layer), written to i..S-1."""
    S = clt.cfg.n_sites
    D = x.shape[1] // S
    lats, outs = [], []
    for i in range(S):
        pre = x[:, i * D:(i + 1) * D] @ clt.W_enc[i] + clt.b_enc[i]
        r = pre.clamp_min(0)
        if clt.cfg.activation == "topk":
            keep = torch.zeros_like(r, dtype=torch.bool)
            for t in range(len(x)):
                keep[t, r[t].argsort(descending=True)[: clt.cfg.k]] = True
            r = torch.where(keep, r, torch.zeros_like(r))
        lats.append(r)
    for j in range(S):
        out = clt.b_dec[j * D:(j + 1) * D].clone()
        for i in range(j + 1):
            out = out + lats[i] @ clt.W_dec[i][:, j - i, :]
        outs.append(out)
    return torch.cat(outs, 1), torch.cat(lats, 1)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_cross_layer_transcoder_matches_layer_by_layer_reference(activation):
    clt = _clt(activation)
    x = torch.randn(6, 12, dtype=torch.float64)
    out = clt(x)
    ref_out, ref_lat = _clt_reference(clt, x)
    torch.testing.assert_close(out.latents, ref_lat)
    torch.testing.assert_close(out.out, ref_out)
    y = torch.randn(6, 12, dtype=torch.float64)
    params = [clt.W_enc, clt.b_enc, *clt.W_dec, clt.b_dec]
    grads = torch.autograd.grad(((out.out - y) ** 2).sum(), params)
    ref_grads = torch.autograd.grad(((ref_out - y) ** 2).sum(), params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_clt_batchtopk_selects_per_source_layer():
    clt = _clt("batchtopk", k=2)
    clt.train()
    x = torch.randn(5, 12, dtype=torch.float64)
    lat = clt(x).latents.view(5, 3, 5)
    for i in range(3):  # each layer keeps its own k·T = 10 largest over the batch
        r = (x[:, i * 4:(i + 1) * 4] @ clt.W_enc[i] + clt.b_enc[i]).clamp_min(0)
        cutoff = r.flatten().sort(descending=True).values[9]
        torch.testing.assert_close(lat[:, i], torch.where(r >= cutoff, r, torch.zeros_like(r)))


def test_crosscoder_is_one_dictionary_over_concatenated_sites():
    coder = build_coder(CoderConfig(d_in=8, n_latents=10, k=3, n_sites=2), dtype=torch.float64)
    assert coder.cfg.kind == "crosscoder" and isinstance(coder, SparseCoder)
    x = torch.randn(5, 8, dtype=torch.float64)
    ref_out, ref_lat = _reference(coder, x)  # the SAE math on the concatenation
    torch.testing.assert_close(coder(x).latents, ref_lat)
    torch.testing.assert_close(coder(x).out, ref_out)
    assert coder.site_slices() == [slice(0, 4), slice(4, 8)]


@pytest.mark.parametrize("kind", ["crosscoder", "clt"])
def test_per_site_scales_fold_into_the_weights(kind):
    coder = (_clt("topk") if kind == "clt" else
             build_coder(CoderConfig(d_in=12, n_latents=20, k=3, n_sites=3), dtype=torch.float64))
    scale = torch.tensor([0.5] * 4 + [2.0] * 4 + [0.1] * 4, dtype=torch.float64)
    coder.input_scale.copy_(scale)
    coder.target_scale.copy_(scale if kind == "crosscoder" else scale.flip(0))
    x = torch.randn(6, 12, dtype=torch.float64)
    folded = coder.folded()
    torch.testing.assert_close(folded(x).out, coder(x).out)
    torch.testing.assert_close(folded(x).latents, coder(x).latents)


def test_site_fvu_averages_per_site_fvus():
    coder = build_coder(CoderConfig(d_in=4, n_latents=8, k=2, n_sites=2), dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0, 10.0, 0.0], [2.0, 0.0, 30.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 0.0, 10.0, 0.0], [1.0, 0.0, 20.0, 0.0]], dtype=torch.float64)
    # site 0: residual² 2, variance 2 → 1.0; site 1: residual² 100, variance 200 → 0.5
    assert float(site_fvu(coder, y, r)) == pytest.approx(0.75)


def test_batchtopk_threshold_is_the_batch_cutoff_so_inference_keeps_k_per_token():
    """With momentum 0 the threshold is the smallest value BatchTopK kept; every kept value but
    that one exceeds it and every dropped value does not, so on the same batch inference keeps
    exactly k·T − 1 activations."""
    coder = _coder("batchtopk", F=40, D=6, k=3)
    x = torch.randn(50, 6, dtype=torch.float64)
    coder.train()
    kept = coder(x).latents
    coder.update_batchtopk_threshold(kept, momentum=0.0)
    assert torch.all(coder.threshold == kept[kept > 0].min())
    coder.eval()
    assert int((coder.encode(x) > 0).sum()) == 3 * 50 - 1
