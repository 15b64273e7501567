"""The certified bf16 TopK encoder against a plain fp32 top-k (the reference), its error bound against
the measured bf16 error, and the TopK coder on that path against the coder on the plain one."""

from __future__ import annotations

import pytest
import torch

import deepseemoe.dictionaries.coder as coder_module
from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder
from deepseemoe.dictionaries.losses import auxk_loss, fvu
from deepseemoe.dictionaries.topk import BF16_UNIT, FP32_UNIT, certified_topk, sampled_pre


def _case(T, D, F, seed, offset=0.0, bias=0.01):
    g = torch.Generator().manual_seed(seed)
    xin = torch.randn(T, D, generator=g) + offset
    W = torch.randn(D, F, generator=g) / D**0.5
    b = torch.randn(F, generator=g) * bias
    return xin, W, b


def _same_choice(idx, ref_idx):
    return torch.equal(idx.sort(dim=1).values, ref_idx.sort(dim=1).values)


@pytest.mark.parametrize(("T", "D", "F", "k", "offset"), [(256, 64, 1024, 16, 0.0), (128, 200, 3000, 40, 0.0),
                                                          (200, 96, 2048, 8, 3.0)])
def test_choice_and_values_are_fp32s(T, D, F, k, offset):
    xin, W, b = _case(T, D, F, seed=D, offset=offset)
    ref = torch.addmm(b, xin, W)
    ref_vals, ref_idx = ref.topk(k, dim=-1)
    _, idx, vals, _ = certified_topk(xin, W, b, k)
    assert _same_choice(idx, ref_idx)
    torch.testing.assert_close(vals, ref.gather(1, idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals.sort(dim=1).values, ref_vals.sort(dim=1).values, rtol=1e-5, atol=1e-5)


def test_a_choice_bf16_gets_wrong_is_caught_and_recomputed():
    """Latents whose fp32 pre-activations differ below bf16's resolution all round to the same bf16
    value, so the bf16 product ranks them arbitrarily; with a small margin the candidates miss fp32's
    winners and only the certificate stands between the caller and a wrong choice."""
    T, F, k = 6, 64, 4
    xin = torch.ones(T, 1)
    W = (1.0 + torch.arange(F, dtype=torch.float32).flip(0) * 4e-5)[None, :]  # 1.0025 … 1.0: one bf16 value
    b = torch.zeros(F)
    pre_bf16 = torch.addmm(b.bfloat16(), xin.bfloat16(), W.bfloat16())
    assert pre_bf16.unique().numel() == 1  # bf16 cannot tell them apart
    _, idx, vals, redone = certified_topk(xin, W, b, k, margin=1)
    assert redone == T
    assert _same_choice(idx, torch.arange(k).expand(T, k))
    torch.testing.assert_close(vals.sort(dim=1, descending=True).values, W[0, :k].expand(T, k).contiguous())


def test_error_bound_holds_for_every_latent():
    """The bound of the module docstring against the measured |fp32 − bf16| on every entry, wide
    vectors and a large offset included (where the bf16 product loses most)."""
    for D, offset in ((32, 0.0), (512, 0.0), (1024, 5.0)):
        xin, W, b = _case(64, D, 2048, seed=D, offset=offset, bias=1.0)
        exact = torch.addmm(b.double(), xin.double(), W.double())
        rounded = torch.addmm(b.bfloat16(), xin.bfloat16(), W.bfloat16()).double()
        x_lo = (xin - xin.bfloat16().float()).norm(dim=1).double()
        w_max = float(W.norm(dim=0).max())
        bound = ((x_lo * (1 + BF16_UNIT) + xin.norm(dim=1).double() * (BF16_UNIT + D * FP32_UNIT * (1 + BF16_UNIT) ** 2))
                 * w_max + BF16_UNIT * float(b.abs().max()))
        # the bf16 result is the product's value rounded once more: |true| ≤ |v| / (1 − 2⁻⁹)
        slack = bound[:, None] + 2 * BF16_UNIT * rounded.abs()
        assert bool(((exact - rounded).abs() <= slack).all())
        assert float(((exact - rounded).abs() / slack).max()) > 0.01  # the bound is not vacuous


def test_sampled_pre_is_the_dense_product_at_the_indices():
    xin, W, b = _case(50, 20, 300, seed=1)
    idx = torch.randint(0, 300, (50, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sampled_pre(xin, W, b, idx), torch.addmm(b, xin, W).gather(1, idx))


@pytest.mark.parametrize("d_out", [None, 24])
def test_topk_coder_on_the_certified_path_equals_the_plain_path(monkeypatch, d_out):
    """Same output, latents, loss and gradients (AuxK included) whichever path chose the latents."""
    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=32, d_out=d_out, n_latents=512, k=12, skip=d_out is not None))
    with torch.no_grad():
        coder.b_enc.normal_(0, 0.1)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
    x = torch.randn(300, 32) + 1.0
    y = x if d_out is None else torch.randn(300, d_out)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::3] = True
    results = {}
    for certified in (False, True):
        monkeypatch.setattr(coder_module, "native_bf16", lambda device, on=certified: on)
        out = coder(x)
        assert (out.pre.dtype == torch.bfloat16) == certified
        loss = fvu(y, out.out) + auxk_loss(coder, y, out, dead, k_aux=24)
        grads = torch.autograd.grad(loss, [coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec])
        results[certified] = (out, loss, grads)
    (plain, plain_loss, plain_grads), (fast, fast_loss, fast_grads) = results[False], results[True]
    assert _same_choice(fast.idx, plain.idx)
    torch.testing.assert_close(fast.latents, plain.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.out, plain.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-4, atol=1e-6)
    for g, r in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("certified", [False, True])
def test_batchtopk_sparse_path_equals_the_dense_batch_choice(monkeypatch, certified):
    """BatchTopK in training keeps the k·T largest relu'd pre-activations of the batch. The sparse path
    finds them among each token's largest (doubling when a token might have more); the reference is
    the dense selection over all T·F entries (`_CoderBase.forward`, checked by hand in test_coder).
    A few loud tokens take far more than 2k latents, so the candidates must widen."""
    from deepseemoe.dictionaries.coder import _CoderBase

    monkeypatch.setattr(coder_module, "native_bf16", lambda device: certified)
    torch.manual_seed(1)
    coder = SparseCoder(CoderConfig(d_in=24, n_latents=400, activation="batchtopk", k=5)).train()
    x = torch.randn(64, 24)
    x[:3] *= 12.0
    widths = []
    top = coder.top_per_token
    monkeypatch.setattr(coder, "top_per_token", lambda xin, k, pre=None, allowed=None:
                        widths.append(k) or top(xin, k, pre, allowed))
    fast = coder(x)
    assert widths[0] == 10 and len(widths) > 1  # it widened
    ref = _CoderBase.forward(coder, x)
    assert torch.equal(fast.latents > 0, ref.latents > 0)
    torch.testing.assert_close(fast.latents, ref.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.out, ref.out, rtol=1e-5, atol=1e-5)
    assert float(fast.l0()) == pytest.approx(float(ref.l0()))
    params = [coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec]
    for g, r in zip(torch.autograd.grad(fvu(x, fast.out), params), torch.autograd.grad(fvu(x, ref.out), params),
                    strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the inference threshold reads the same smallest kept value from either form
    coder.threshold.zero_()
    coder.update_batchtopk_threshold(fast, momentum=0.0)
    sparse_threshold = coder.threshold.clone()
    coder.threshold.zero_()
    coder.update_batchtopk_threshold(ref.latents, momentum=0.0)
    torch.testing.assert_close(sparse_threshold, coder.threshold)
