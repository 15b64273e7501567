"""Sparse coders of MoE internals: one module for SAEs, transcoders, skip-transcoders and router
transcoders — all map a source site x [T, D_in] to a target site y [T, D_out] through F sparse
latents (an SAE is the case y = x).

Shapes: x [T, D_in], y [T, D_out], pre-activations / latents [T, F]; TopK keeps idx/acts [T, k].

    pre     = (x - b_in) @ W_enc + b_enc            b_in = b_dec for an SAE, 0 for a transcoder
    latents = act(pre)                               TopK | BatchTopK | JumpReLU | ReLU
    out     = latents @ W_dec + b_dec (+ x @ W_skip)

Input normalisation: `input_scale` / `target_scale` are scalars (e.g. 1 / mean ‖x‖) applied
before encoding and undone after decoding; `folded()` returns an equivalent coder with the
scales absorbed into the weights, which is what the ecosystem formats store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from deepseemoe.errors import DeepSeeMoEError

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


@dataclass
class CoderConfig:
    d_in: int
    d_out: int | None = None  # None: an SAE (reconstruct the input)
    n_latents: int = 0  # 0: expansion_factor · d_in
    expansion_factor: int = 16
    activation: str = "topk"
    k: int = 32
    skip: bool = False  # a skip connection x @ W_skip (skip-transcoder)
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise DeepSeeMoEError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        if self.n_latents == 0:
            self.n_latents = self.expansion_factor * self.d_in

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict:
        return asdict(self)


class CoderOutput(NamedTuple):
    out: torch.Tensor  # [T, D_out] reconstruction of the target
    latents: torch.Tensor  # [T, F] sparse latent activations (dense layout)
    pre: torch.Tensor  # [T, F] pre-activations


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre - θ): gradient to pre through the gate, to θ by the same rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        gate = (pre > threshold).to(pre.dtype)
        kernel = ((pre - threshold).abs() < eps / 2).to(pre.dtype) / eps
        return grad * gate, -(grad * threshold * kernel).sum(0), None


class SparseCoder(nn.Module):
    def __init__(self, cfg: CoderConfig, *, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        D, F, D_out = cfg.d_in, cfg.n_latents, cfg.out_dim
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(D, F, **kw))
        self.b_enc = nn.Parameter(torch.zeros(F, **kw))
        self.W_dec = nn.Parameter(torch.empty(F, D_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(D_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(D_out, D, **kw)) if cfg.skip else None
        self.log_threshold = (nn.Parameter(torch.full((F,), float(torch.log(torch.tensor(cfg.jumprelu_init_threshold))),
                                                      **kw)) if cfg.activation == "jumprelu" else None)
        # BatchTopK's inference threshold, estimated during training (running mean of the k·B-th value)
        self.register_buffer("threshold", torch.zeros(F, **kw) if cfg.activation == "batchtopk" else None)
        self.register_buffer("input_scale", torch.ones((), **kw))
        self.register_buffer("target_scale", torch.ones((), **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows; an SAE's encoder starts as the decoder's transpose."""
        self.W_dec.normal_()
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        if self.cfg.is_transcoder:
            self.W_enc.normal_(0, self.cfg.d_in**-0.5)
        else:
            self.W_enc.copy_(self.W_dec.T)

    @property
    def thresholds(self) -> torch.Tensor | None:
        if self.log_threshold is not None:
            return self.log_threshold.exp()
        return self.threshold

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale
        if not self.cfg.is_transcoder:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        pre = torch.relu(pre)
        if act == "batchtopk" and not self.training:
            return pre * (pre > self.threshold)
        if act == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        # batchtopk (training): the k·T largest values over the whole batch
        flat = pre.flatten()
        n = min(self.cfg.k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        out = latents @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            out = out + (x * self.input_scale) @ self.W_skip.T
        return out / self.target_scale

    def forward(self, x: torch.Tensor) -> CoderOutput:
        pre = self.pre_activations(x)
        latents = self.activate(pre)
        return CoderOutput(self.decode(latents, x), latents, pre)

    @torch.no_grad()
    def update_batchtopk_threshold(self, latents: torch.Tensor, momentum: float = 0.99) -> None:
        """Running estimate of the smallest kept activation per latent (min over the batch of its
        positive values), which turns BatchTopK into a JumpReLU for inference."""
        if self.threshold is None:
            return
        positive = latents > 0
        mins = torch.where(positive, latents, torch.full_like(latents, float("inf"))).min(0).values
        seen = positive.any(0)
        first = seen & (self.threshold == 0)
        self.threshold[first] = mins[first]
        rest = seen & ~first
        self.threshold[rest] = momentum * self.threshold[rest] + (1 - momentum) * mins[rest]

    @torch.no_grad()
    def folded(self) -> SparseCoder:
        """An equivalent coder with input/target scales folded into the weights (scales = 1).

        pre = (s·x − b_dec)W_enc + b_enc        → W_enc' = s·W_enc, b_enc' = b_enc − b_dec W_enc/1 and
        out = (lat W_dec + b_dec + s·x W_skipᵀ)/t → W_dec' = W_dec/t, b_dec' = b_dec/t, W_skip' = s·W_skip/t
        For an SAE the pre-encoder bias stays b_dec' (= b_dec/t with t = s), so the identity holds.
        """
        s, t = float(self.input_scale), float(self.target_scale)
        new = SparseCoder(self.cfg, device=self.W_enc.device, dtype=self.W_enc.dtype)
        new.load_state_dict(self.state_dict())
        new.W_enc.mul_(s)
        # SAE: (s·x − b)W + c = (x − b/s)·sW + c, and b' = b/t is the same pre-encoder bias only if t = s
        if not self.cfg.is_transcoder and abs(s - t) > 1e-12 * max(s, t):
            raise DeepSeeMoEError("an SAE must use the same input and target scale")
        new.W_dec.div_(t)
        new.b_dec.div_(t)
        if new.W_skip is not None:
            new.W_skip.mul_(s / t)
        new.input_scale.fill_(1.0)
        new.target_scale.fill_(1.0)
        return new
