"""Exact TopK encoding at bf16 speed: the encoder's dense product in bf16, the choice certified exact.

Shapes: xin [T, D] (the encoder's input, fp32), W_enc [D, F], b_enc [F]; idx and vals [T, k].

A TopK coder's forward is one dense product, pre = xin @ W_enc + b_enc [T, F], and a top-k per
row; at D=1024, F=32k that product is most of a training step on a CPU. Where the CPU multiplies
bf16 natively (AVX512-BF16 or AMX), a bf16 product runs about 3.5× faster than fp32 (2-core EPYC:
0.43 s against 1.5 s for T=4096). Rounding could change which latents win, so `certified_topk`:

1. takes the k + m largest of the bf16 product as candidates (m = k);
2. recomputes the candidates' pre-activations in fp32 (a sampled product: T·(k+m)·D work, not
   T·F·D) and keeps the k largest, with their fp32 values;
3. proves, per row, that no other latent could have beaten them: every non-candidate's bf16 value
   is at most v_b (the smallest candidate's), so its fp32 value is at most
   v_b + 2⁻⁸|v_b| + E_t (the bf16 output's rounding, then the product's error bound below); when the
   k-th kept value is at least that, the row's choice is exactly fp32's;
4. recomputes the rows it cannot prove in fp32 (dense, those rows only).

The error bound: rounding to bf16 gives x = x_hi + x_lo with |x_lo| ≤ 2⁻⁹|x| elementwise (likewise
w), and the bf16 product accumulates in fp32, so for latent f
    |x·w − fl(x_hi·w_hi)| ≤ ‖x_lo‖‖w_hi‖ + ‖x‖‖w_lo‖ + D·2⁻²⁴·‖x_hi‖‖w_hi‖
                          ≤ (‖x_lo‖(1 + 2⁻⁹) + ‖x‖(2⁻⁹ + D·2⁻²⁴(1 + 2⁻⁹)²))·max_f ‖w_f‖,
plus 2⁻⁹·max|b_enc| for the bias rounded to bf16. The selection is then the top-k of the fp32
pre-activations (up to exact ties, and to the last-bit differences of fp32 summation order), which
tests/dictionaries/test_topk.py checks against a plain fp32 top-k, certificate failures included.
"""

from __future__ import annotations

import warnings

import torch

BF16_UNIT = 2.0**-9  # bf16's unit roundoff (8 significant bits, round to nearest)
FP32_UNIT = 2.0**-24


def native_bf16(device: torch.device) -> bool:
    """Whether this device's bf16 products beat fp32 enough to pay for the certificate: a CPU with
    AVX512-BF16 or AMX. (On CUDA the trainer uses bf16 autocast instead.)"""
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def sampled_pre(xin: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """pre[t, idx[t, j]] = xin[t] · W_enc[:, idx[t, j]] + b_enc[idx[t, j]] in fp32, without the [T, F]
    product: a sampled dense-dense product on the CSR pattern of idx."""
    T, n = idx.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR is beta": sampled_addmm on CSR is stable on CPU
        pattern = torch.sparse_csr_tensor(torch.arange(0, T * n + 1, n, device=idx.device), idx.flatten(),
                                          xin.new_zeros(T * n), size=(T, W_enc.shape[1]))
        dots = torch.sparse.sampled_addmm(pattern, xin, W_enc, beta=0.0).values().view(T, n)
    return dots + b_enc[idx]


def bf16_pre(xin: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """The encoder's product in bf16 [T, F], for choosing candidates only."""
    return torch.addmm(b_enc.to(torch.bfloat16), xin.to(torch.bfloat16), W_enc.to(torch.bfloat16))


@torch.no_grad()
def certified_topk(xin: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                   pre: torch.Tensor | None = None, margin: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(pre_bf16 [T, F], idx [T, k], vals [T, k] fp32, rows recomputed in fp32): per row, the top-k of
    the fp32 pre-activations, found from a bf16 product (module docstring). `pre` reuses a bf16
    product already made (`bf16_pre`); values read from it are bf16-rounded, which is why `vals`
    comes back."""
    T, D = xin.shape
    pre = bf16_pre(xin, W_enc, b_enc) if pre is None else pre
    m = min(k if margin is None else margin, pre.shape[1] - k)
    if m <= 0 or T == 0:  # every latent is a candidate: fp32 throughout
        vals, idx = torch.addmm(b_enc, xin, W_enc).topk(k, dim=-1, sorted=False)
        return pre, idx, vals, T
    cand_vals, cand = pre.topk(k + m, dim=-1, sorted=False)
    top = sampled_pre(xin, W_enc, b_enc, cand).topk(k, dim=-1, sorted=False)
    idx, vals = cand.gather(1, top.indices), top.values
    x_lo = (xin - xin.to(torch.bfloat16).float()).norm(dim=1)
    w_max = W_enc.norm(dim=0).max()
    bound = ((x_lo * (1 + BF16_UNIT) + xin.norm(dim=1) * (BF16_UNIT + D * FP32_UNIT * (1 + BF16_UNIT) ** 2)) * w_max
             + BF16_UNIT * b_enc.abs().max())
    v_b = cand_vals.float().min(dim=1).values
    proven = vals.min(dim=1).values >= v_b + 2 * BF16_UNIT * v_b.abs() + bound
    bad = (~proven).nonzero().squeeze(1)
    if len(bad):
        redo = torch.addmm(b_enc, xin[bad], W_enc).topk(k, dim=-1, sorted=False)
        idx[bad], vals[bad] = redo.indices, redo.values
    return pre, idx, vals, len(bad)
