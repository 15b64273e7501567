"""Training losses of sparse coders.

Shapes: target y and reconstruction ŷ [T, D_out]; latents and pre-activations [T, F].

FVU is normalised by the target's total variance in the batch, Σ‖y − mean_T(y)‖², so 1.0
means "no better than predicting the batch mean" (sparsify's normalisation; SAELens' "MSE"
divides by the number of elements instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deepseemoe.dictionaries.coder import Coder, CoderOutput


class _Step(torch.autograd.Function):
    """H(pre − θ) with the rectangle-kernel straight-through gradient for θ (JumpReLU L0)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype) / ctx.bandwidth
        return None, -(grad * kernel).sum(0), None


def fvu(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    total = (target - target.mean(0)).pow(2).sum()
    return (target - recon).pow(2).sum() / total.clamp_min(torch.finfo(target.dtype).tiny)


def site_fvu(coder: Coder, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean over the target's sites of each site's FVU (one site: plain FVU), so a crosscoder or
    CLT is not dominated by the layers with the largest activations."""
    blocks = coder.site_slices("target")
    return torch.stack([fvu(target[:, b], recon[:, b]) for b in blocks]).mean()


def auxk_loss(coder: Coder, target: torch.Tensor, output: CoderOutput, dead: torch.Tensor,
              k_aux: int, normalized: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """Reconstruct the residual with the k_aux largest pre-activations among dead latents
    (Gao et al. 2024), normalised like FVU on the residual (`normalized(residual, recon)`; the
    data-parallel trainer passes one that uses the global batch's variance)."""
    normalized = normalized or (lambda r, rec: site_fvu(coder, r, rec))
    n_dead = int(dead.sum())
    if n_dead == 0:
        return target.new_zeros(())
    residual = (target - output.out).detach() * coder.target_scale
    if output.idx is not None:  # sparse path (TopK, BatchTopK): pick among dead latents, gather sparsely
        idx, vals = coder.topk_among(output, dead, min(k_aux, n_dead))
        recon = torch.nn.functional.embedding_bag(idx, coder.W_dec, per_sample_weights=vals, mode="sum")
        return normalized(residual, recon)
    pre = torch.relu(output.pre).masked_fill(~dead, 0.0)
    vals, idx = pre.topk(min(k_aux, n_dead), dim=-1)
    recon = coder.decode_latents(torch.zeros_like(pre).scatter(-1, idx, vals))
    return normalized(residual, recon)


def sparsity_penalty(coder: Coder, output: CoderOutput) -> torch.Tensor:
    """ReLU: L1 of latents weighted by decoder norms; JumpReLU: expected L0 (straight-through)."""
    if coder.cfg.activation == "relu":
        return (output.latents * coder.decoder_norms()).sum(-1).mean()
    if coder.cfg.activation == "jumprelu":
        return _Step.apply(output.pre, coder.log_threshold.exp(), coder.cfg.jumprelu_bandwidth).sum(-1).mean()
    return output.pre.new_zeros(())
