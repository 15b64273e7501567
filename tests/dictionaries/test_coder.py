"""Sparse coders against references written here in plain torch, on tiny cases."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder
from deepseemoe.dictionaries.losses import auxk_loss, fvu, sparsity_penalty

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


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_gradients_match_autograd_of_reference(activation):
    coder = _coder(activation, d_out=4, skip=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64)
    loss = fvu(y, coder(x).out)
    grads = torch.autograd.grad(loss, [coder.W_enc, coder.W_dec, coder.b_dec, coder.W_skip])
    ref_out, _ = _reference(coder, x)
    ref_loss = ((y - ref_out) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    ref_grads = torch.autograd.grad(ref_loss, [coder.W_enc, coder.W_dec, coder.b_dec, coder.W_skip])
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
    assert float(auxk_loss(coder, y, out, torch.zeros(6, dtype=torch.bool), 2)) == 0.0


@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_folding_scales_into_weights_preserves_outputs(kind):
    coder = _coder("topk", d_out=None if kind == "sae" else 5, skip=kind == "skip_transcoder")
    coder.input_scale.fill_(0.25)
    coder.target_scale.fill_(0.25 if kind == "sae" else 2.0)
    x = torch.randn(6, 5, dtype=torch.float64)
    folded = coder.folded()
    assert float(folded.input_scale) == 1.0 and float(folded.target_scale) == 1.0
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
