"""Sparse coders of MoE internals. One class covers SAEs, transcoders, skip-transcoders, router
transcoders and crosscoders; `CrossLayerTranscoder` covers CLTs. Every coder maps a source x
[T, D_in] to a target y [T, D_out] through F sparse latents (an SAE is the case y = x).

Shapes: x [T, D_in], y [T, D_out], pre-activations / latents [T, F]. A crosscoder or CLT reads
`n_sites` equal-width sites concatenated along the last axis (x [T, S·D]); a CLT has F/S latents
per source layer, and those of layer i write to the target layers i..S-1.

    SparseCoder:  pre = (s⊙x − b_in) @ W_enc + b_enc        b_in = b_dec for an SAE, 0 for a transcoder
                  out = (act(pre) @ W_dec + b_dec + (s⊙x) @ W_skipᵀ) / t
    CLT:          pre_i = (s⊙x)_i @ W_enc[i] + b_enc[i]
                  out_j = (Σ_{i≤j} act(pre_i) @ W_dec[i][:, j−i] + b_dec_j) / t_j

Activations: TopK (per token, per source layer for a CLT), BatchTopK (the k·T largest over the
batch, per source layer; its running threshold makes it a JumpReLU at inference), JumpReLU
(straight-through threshold gradient), ReLU (+ L1 in the loss).

Ternary coders (`ternary`: encoder, decoder or both; not CLTs): BitNet b1.58's absmean rule with one
scale per latent — W_enc's column f and W_dec's row f become s_f·{−1, 0, 1}. Trained as in
BinaryConnect: the forward and backward run on the ternary weights (`ternary_weights()`), the
optimizer updates float weights kept underneath; `bake_ternary_()` leaves the ternary ones.

Input normalisation: s [D_in] and t [D_out] are per-dimension scales (constant within a site,
e.g. √D / mean ‖x_site‖), applied before encoding and undone after decoding; `folded()` returns an
equivalent coder with them absorbed into the weights, which is what the exchange formats store.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepseemoe.dictionaries.topk import bf16_pre, certified_topk, native_bf16
from deepseemoe.errors import DeepSeeMoEError

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
TERNARY = ("", "encoder", "decoder", "both")


def check_ternary(ternary: str, cross_layer: bool) -> None:
    """Refuse a ternary setting a coder cannot take (a run config checks it before any model loads)."""
    if ternary not in TERNARY:
        raise DeepSeeMoEError(f"ternary: {ternary!r}; choose encoder, decoder or both (or leave it out)")
    if ternary and cross_layer:
        raise DeepSeeMoEError("ternary weights are not available for cross-layer transcoders; drop ternary")


@dataclass
class CoderConfig:
    d_in: int
    d_out: int | None = None  # None: an SAE / crosscoder (reconstruct the input)
    n_latents: int = 0  # 0: expansion_factor · d_in (for a CLT: in all, over its layers)
    expansion_factor: int = 16
    activation: str = "topk"
    k: int = 32  # per token (per source layer for a CLT)
    skip: bool = False  # a skip connection x @ W_skipᵀ (skip-transcoder)
    n_sites: int = 1  # crosscoder / CLT: sites concatenated in the source and target
    cross_layer: bool = False  # CLT: latents of site i write to target sites i..n_sites-1
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    ternary: str = ""  # "", "encoder", "decoder" or "both" (module docstring)
    # CLT: latents of site i write to sites i..i+neighbours only (0: each layer its own, a per-layer
    # transcoder set; None: every later site). The other decoder slices are held at zero.
    neighbours: int | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise DeepSeeMoEError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        check_ternary(self.ternary, self.cross_layer)
        if self.n_latents == 0:
            self.n_latents = self.expansion_factor * self.d_in
        S = self.n_sites
        if S < 1 or self.d_in % S or self.out_dim % S or (self.cross_layer and self.n_latents % S):
            raise DeepSeeMoEError(f"n_sites={S} must divide d_in={self.d_in}, d_out={self.out_dim}"
                                  f"{' and n_latents=' + str(self.n_latents) if self.cross_layer else ''}")
        if self.neighbours is not None and (not self.cross_layer or self.neighbours < 0):
            raise DeepSeeMoEError(f"neighbours: {self.neighbours} — a count ≥ 0 of the following layers a "
                                  "cross-layer transcoder writes to; only for kind clt")
        if self.cross_layer and self.skip:
            raise DeepSeeMoEError("a cross-layer transcoder has no skip connection; drop skip or cross_layer")
        if self.activation in ("topk", "batchtopk") and self.k > self.latents_per_group:
            raise DeepSeeMoEError(f"k={self.k} exceeds the {self.latents_per_group} latents it selects from")

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def groups(self) -> int:
        """Latent groups that select their top-k separately (a CLT's source layers)."""
        return self.n_sites if self.cross_layer else 1

    @property
    def latents_per_group(self) -> int:
        return self.n_latents // self.groups

    @property
    def kind(self) -> str:
        if self.cross_layer:
            return "clt"
        if self.n_sites > 1:
            return "crosscoder"
        if self.skip:
            return "skip_transcoder"
        return "transcoder" if self.is_transcoder else "sae"

    def to_dict(self) -> dict:
        return asdict(self)


class CoderOutput:
    """A coder's forward: the reconstruction, and the latents either dense [T, F] or, on the sparse
    path (TopK; BatchTopK in training), as (idx, vals) [T, W] — W = k for TopK, BatchTopK's candidates
    with 0 where not kept — with `latents` built only when asked for. `pre` [T, F] is bf16 on the
    certified path (dictionaries/topk.py): good for choosing, not for values."""

    def __init__(self, out: torch.Tensor, pre: torch.Tensor, latents: torch.Tensor | None = None,
                 idx: torch.Tensor | None = None, vals: torch.Tensor | None = None,
                 encoder_input: torch.Tensor | None = None):
        self.out, self.pre, self._latents = out, pre, latents
        self.idx, self.vals, self.encoder_input = idx, vals, encoder_input

    @property
    def latents(self) -> torch.Tensor:
        if self._latents is None:
            self._latents = torch.zeros(self.pre.shape, dtype=self.vals.dtype, device=self.vals.device) \
                .scatter(-1, self.idx, self.vals)
        return self._latents

    def fired(self) -> torch.Tensor:
        """[F] 1.0 where a latent fired on any token of the batch."""
        if self._latents is None:
            hit = torch.zeros(self.pre.shape[-1], device=self.pre.device)
            return hit.index_fill_(0, self.idx[self.vals > 0], 1.0)
        return (self._latents > 0).any(0).float()

    def l0(self) -> torch.Tensor:
        src = self.vals if self._latents is None else self._latents
        return (src > 0).sum(-1).float().mean()


def _csr_backward(device: torch.device) -> bool:
    """CSR products on CPU (13× faster than index_add there); index_add / embedding_bag elsewhere."""
    return device.type == "cpu"


class _SparseGather(torch.autograd.Function):
    """vals = pre[t, idx[t, j]] for pre = xin @ W_enc + b_enc, the values computed without autograd
    by the caller, with a sparse backward: only the k chosen pre-activations per token carry
    gradient, so W_enc's gradient is CSR(g)ᵀ @ xin (CPU) or an index_add (elsewhere) — never a
    dense [T, F] product."""

    @staticmethod
    def forward(ctx, xin, W_enc, b_enc, idx, vals):
        ctx.save_for_backward(xin, W_enc, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        xin, W_enc, idx = ctx.saved_tensors
        (T, k), F = idx.shape, W_enc.shape[1]
        flat_idx, flat_g = idx.flatten(), g.flatten().to(W_enc.dtype)
        grad_x = grad_W = grad_b = None
        if _csr_backward(xin.device):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR is beta": mm on CSR/CSC is stable on CPU
                G = torch.sparse_csr_tensor(torch.arange(0, T * k + 1, k, device=idx.device), flat_idx, flat_g,
                                            size=(T, F))
                if ctx.needs_input_grad[1]:
                    grad_W = (G.t() @ xin.to(W_enc.dtype)).T
                if ctx.needs_input_grad[0]:
                    grad_x = (G @ W_enc.T).to(xin.dtype)
        else:
            if ctx.needs_input_grad[1]:
                rows = (g.unsqueeze(2) * xin.unsqueeze(1)).reshape(T * k, -1).to(W_enc.dtype)
                grad_W = torch.zeros(F, W_enc.shape[0], device=W_enc.device, dtype=W_enc.dtype) \
                    .index_add_(0, flat_idx, rows).T
            if ctx.needs_input_grad[0]:
                grad_x = torch.nn.functional.embedding_bag(idx, W_enc.T, per_sample_weights=g.to(W_enc.dtype),
                                                           mode="sum").to(xin.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(F, device=g.device, dtype=W_enc.dtype).index_add_(0, flat_idx, flat_g)
        return grad_x, grad_W, grad_b, None, None


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


class _CoderBase(nn.Module):
    """What every coder shares: activations, scales, thresholds and the decoder constraints the
    trainer applies (through `decoder_norms`, `decode_latents`, `normalize_decoder_`, …)."""

    cfg: CoderConfig

    def _init_common(self, cfg: CoderConfig, kw: dict) -> None:
        F = cfg.n_latents
        self.log_threshold = (nn.Parameter(torch.full((F,), float(torch.log(torch.tensor(cfg.jumprelu_init_threshold))),
                                                      **kw)) if cfg.activation == "jumprelu" else None)
        # BatchTopK's inference threshold, estimated during training (running mean of the smallest kept value)
        self.register_buffer("threshold", torch.zeros(F, **kw) if cfg.activation == "batchtopk" else None)
        self.register_buffer("input_scale", torch.ones(cfg.d_in, **kw))
        self.register_buffer("target_scale", torch.ones(cfg.out_dim, **kw))

    def _ternary_params(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, the dimension its per-latent scale averages over): W_enc [D, F] per column,
        W_dec [F, D] per row."""
        which = self.cfg.ternary
        out = []
        if which in ("encoder", "both"):
            out.append((self.W_enc, 0))
        if which in ("decoder", "both"):
            out.append((self.W_dec, 1))
        return out

    @contextlib.contextmanager
    def ternary_weights(self) -> Iterator[None]:
        """Inside: the ternary parameters hold their ternarisation (forward and backward see W_q, so the
        gradient is the straight-through one); on exit the float weights are back, for the optimizer."""
        kept = self.bake_ternary_()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in kept:
                    p.copy_(w)

    @torch.no_grad()
    def bake_ternary_(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Write the ternary weights in place (at the end of training, they stay); returns each parameter
        with the float weights it held."""
        from deepseemoe.models.ternary import ternarize

        kept = []
        for p, over in self._ternary_params():
            kept.append((p, p.detach().clone()))
            trits, s = ternarize(p, in_dim=over, per="row")
            p.copy_(trits.to(p.dtype) * s.to(p.dtype))
        return kept

    @property
    def thresholds(self) -> torch.Tensor | None:
        if self.log_threshold is not None:
            return self.log_threshold.exp()
        return self.threshold

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        pre = torch.relu(pre)
        if act == "batchtopk" and not self.training:
            return pre * (pre > self.threshold)
        T, G, k = pre.shape[0], self.cfg.groups, self.cfg.k
        grouped = pre.view(T, G, -1)
        if act == "topk":
            vals, idx = grouped.topk(k, dim=-1, sorted=False)
            return torch.zeros_like(grouped).scatter(-1, idx, vals).view_as(pre)
        # batchtopk (training): the k·T largest values of each group over the whole batch
        flat = grouped.transpose(0, 1).reshape(G, -1)
        vals, idx = flat.topk(min(k * T, flat.shape[1]), dim=-1, sorted=False)
        kept = torch.zeros_like(flat).scatter(-1, idx, vals)
        return kept.view(G, T, -1).transpose(0, 1).reshape_as(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def forward(self, x: torch.Tensor) -> CoderOutput:
        pre = self.pre_activations(x)
        latents = self.activate(pre)
        return CoderOutput(self.decode(latents, x), pre, latents=latents)

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        out = self.decode_latents(latents) + self.b_dec
        if getattr(self, "W_skip", None) is not None:
            out = out + (x * self.input_scale) @ self.W_skip.T
        return out / self.target_scale

    def site_slices(self, which: str = "target") -> list[slice]:
        """Column blocks of the source or target, one per site (the unit of FVU and of scales)."""
        width = (self.cfg.out_dim if which == "target" else self.cfg.d_in) // self.cfg.n_sites
        return [slice(i * width, (i + 1) * width) for i in range(self.cfg.n_sites)]

    @torch.no_grad()
    def update_batchtopk_threshold(self, latents: torch.Tensor | CoderOutput, momentum: float = 0.9) -> None:
        """Running mean of the smallest activation BatchTopK kept in the batch, one threshold per
        latent group (the whole dictionary; a CLT's source layer) — Bussmann et al.'s inference
        rule, which keeps L0 ≈ k. (A per-latent minimum is biased high for rare latents and drops
        L0 far below k.) The EMA forgets the first, untrained batches within ~1/(1−momentum) steps."""
        if self.threshold is None:
            return
        G = self.cfg.groups
        if isinstance(latents, CoderOutput) and latents.idx is not None and G == 1:  # sparse: its kept values
            vals = latents.vals.detach()
            mins = torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).amin().reshape(1)
        else:
            dense = latents.latents.detach() if isinstance(latents, CoderOutput) else latents
            grouped = dense.view(dense.shape[0], G, -1)
            mins = torch.where(grouped > 0, grouped, torch.full_like(grouped, float("inf"))).amin(dim=(0, 2))  # [G]
        current = self.threshold.view(G, -1)[:, 0]
        new = torch.where(current == 0, mins, momentum * current + (1 - momentum) * mins)
        new = torch.where(torch.isinf(mins), current, new)  # a group that kept nothing keeps its value
        self.threshold.copy_(new[:, None].expand(G, self.threshold.numel() // G).reshape(-1))

    def _fold_check(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.input_scale, self.target_scale
        # SAE: (s⊙x − b)W + c = (x − b/s)(sW) + c, and b' = b/t is that pre-encoder bias only if t = s
        if not self.cfg.is_transcoder and not torch.allclose(s, t, rtol=1e-12, atol=0):
            raise DeepSeeMoEError("an SAE or crosscoder must use the same input and target scale")
        return s, t


class SparseCoder(_CoderBase):
    def __init__(self, cfg: CoderConfig, *, device=None, dtype=None):
        super().__init__()
        if cfg.cross_layer:
            raise DeepSeeMoEError("a cross-layer config builds a CrossLayerTranscoder; use build_coder(cfg)")
        self.cfg = cfg
        D, F, D_out = cfg.d_in, cfg.n_latents, cfg.out_dim
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(D, F, **kw))
        self.b_enc = nn.Parameter(torch.zeros(F, **kw))
        self.W_dec = nn.Parameter(torch.empty(F, D_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(D_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(D_out, D, **kw)) if cfg.skip else None
        self.batch_width = 0  # BatchTopK's candidates per token to try first (`_batch_top`); the trainer checkpoints it
        self._init_common(cfg, kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows; an SAE's encoder starts as the decoder's transpose."""
        self.W_dec.normal_()
        self.normalize_decoder_()
        if self.cfg.is_transcoder:
            self.W_enc.normal_(0, self.cfg.d_in**-0.5)
        else:
            self.W_enc.copy_(self.W_dec.T)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale
        return x if self.cfg.is_transcoder else x - self.b_dec

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, self.encoder_input(x), self.W_enc)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec

    def forward(self, x: torch.Tensor) -> CoderOutput:
        act = self.cfg.activation
        if not (act == "topk" or (act == "batchtopk" and self.training)):
            return super().forward(x)
        # TopK / BatchTopK fast path: one dense product (the encoder), everything after it sparse
        xin = self.encoder_input(x)
        with torch.no_grad():
            if act == "topk":
                pre, idx, picked = self.top_per_token(xin, self.cfg.k)
                kept = None
            else:
                pre, idx, picked, kept = self._batch_top(xin)
        vals = torch.relu(_SparseGather.apply(xin, self.W_enc, self.b_enc, idx, picked))
        if kept is not None:
            vals = vals * kept
        return CoderOutput(self.decode_sparse(idx, vals, x), pre, idx=idx, vals=vals, encoder_input=xin)

    @torch.no_grad()
    def top_per_token(self, xin: torch.Tensor, k: int, pre: torch.Tensor | None = None,
                      allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre, idx, values) of the k largest pre-activations of each token (among the `allowed`
        latents [F]), values in the encoder's precision. On a CPU with native bf16 the product is
        bf16 and the choice certified (dictionaries/topk.py), so `pre` is bf16 there and serves only
        later choices; `pre` given: a product this forward already made. The top-k of pre equals the
        top-k of relu(pre) up to ties at 0."""
        certify = xin.dtype == torch.float32 and self.W_enc.dtype == torch.float32 and native_bf16(xin.device)
        if pre is None:
            pre = bf16_pre(xin, self.W_enc, self.b_enc) if certify else torch.addmm(self.b_enc, xin, self.W_enc)
        certify = certify and pre.dtype == torch.bfloat16
        # among some latents only (AuxK's dead ones): choose within their columns, then name them
        cols = None if allowed is None else allowed.nonzero().squeeze(1)
        sub = pre if cols is None else pre.index_select(1, cols)
        if certify:
            W, b = (self.W_enc, self.b_enc) if cols is None else (self.W_enc.index_select(1, cols), self.b_enc[cols])
            _, idx, picked, _ = certified_topk(xin, W, b, k, pre=sub)
        else:
            picked, idx = sub.topk(k, dim=-1, sorted=False)
        return pre, (idx if cols is None else cols[idx]), picked

    def _batch_top(self, xin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """BatchTopK's k·T largest relu'd pre-activations of the batch, as per-token candidates
        (pre, idx, values [T, W]) and which of them are kept [T, W]. The candidates are each token's
        W largest (W = `batch_width`, at least 2k): when a token keeps all W and its W-th is positive,
        a latent outside its candidates might belong too, and W doubles; otherwise every latent outside
        is at most its token's W-th candidate, which was not kept, so the choice is the dense one (up to
        ties)."""
        T, F, k = xin.shape[0], self.cfg.n_latents, self.cfg.k
        width, pre = min(max(2 * k, self.batch_width), F), None
        while True:
            pre, idx, picked = self.top_per_token(xin, width, pre)
            flat = picked.clamp_min(0).flatten()
            kept = torch.zeros_like(flat, dtype=torch.bool)
            kept[flat.topk(min(k * T, flat.numel()), sorted=False).indices] = True
            kept = kept.view(T, width)
            full = kept.all(dim=1) & (picked.min(dim=1).values > 0)
            if width == F or not bool(full.any()):
                break
            width = min(2 * width, F)
        # the next batch starts where this one would have needed no doubling (a power of two above
        # its busiest token's count, with room), so a step usually takes one round
        busiest = int(kept.sum(dim=1).max()) if T else 0
        self.batch_width = max(2 * k, 1 << math.ceil(math.log2(busiest * 5 / 4 + 1)))
        return pre, idx, picked, kept

    def topk_among(self, output: CoderOutput, allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, relu'd values) [T, k] of the k largest pre-activations among the `allowed` latents [F]
        (AuxK's dead ones), the values with gradient to the encoder (sparse backward), chosen the way
        the forward chose (certified where it was)."""
        _, idx, picked = self.top_per_token(output.encoder_input, k, pre=output.pre, allowed=allowed)
        return idx, torch.relu(_SparseGather.apply(output.encoder_input, self.W_enc, self.b_enc, idx, picked))

    def decode_sparse(self, idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """decode() for latents given as (idx, vals) [T, k]: an embedding bag over W_dec's rows."""
        out = torch.nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype),
                                                mode="sum") + self.b_dec
        if self.W_skip is not None:
            out = out + (x * self.input_scale) @ self.W_skip.T
        return out / self.target_scale

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the decoder gradient along each (unit) row, so a step does not change its norm."""
        w = self.W_dec
        if w.grad is not None:
            w.grad -= (w.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def folded(self) -> SparseCoder:
        """An equivalent coder with the scales folded into the weights (scales = 1)."""
        s, t = self._fold_check()
        new = SparseCoder(self.cfg, device=self.W_enc.device, dtype=self.W_enc.dtype)
        new.load_state_dict(self.state_dict())
        new.W_enc.mul_(s[:, None])
        new.W_dec.div_(t[None, :])
        new.b_dec.div_(t)
        if new.W_skip is not None:
            new.W_skip.mul_(s[None, :] / t[:, None])
        new.input_scale.fill_(1.0)
        new.target_scale.fill_(1.0)
        return new


class CrossLayerTranscoder(_CoderBase):
    """Reads S layers' sources; the F/S latents of layer i write to the targets of layers i..S-1.

    W_enc [S, D, Fl], b_enc [S, Fl], W_dec[i] [Fl, S−i, D_out/S] (circuit-tracer's layout), b_dec [D_out].
    """

    def __init__(self, cfg: CoderConfig, *, device=None, dtype=None):
        super().__init__()
        if not cfg.cross_layer:
            raise DeepSeeMoEError("CrossLayerTranscoder needs cross_layer=True in its config")
        self.cfg = cfg
        S, Fl = cfg.n_sites, cfg.latents_per_group
        D, Do = cfg.d_in // S, cfg.out_dim // S
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(S, D, Fl, **kw))
        self.b_enc = nn.Parameter(torch.zeros(S, Fl, **kw))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(Fl, S - i, Do, **kw)) for i in range(S)])
        self.b_dec = nn.Parameter(torch.zeros(S * Do, **kw))
        self._init_common(cfg, kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in self.W_dec:
            w.normal_()
            w[:, self.reach(w):].zero_()  # beyond `neighbours`: held at zero (never used in decode)
        self.normalize_decoder_()
        self.W_enc.normal_(0, (self.cfg.d_in // self.cfg.n_sites) ** -0.5)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        S = self.cfg.n_sites
        xs = (x * self.input_scale).view(x.shape[0], S, -1)
        return (torch.einsum("tsd,sdf->tsf", xs, self.W_enc) + self.b_enc).reshape(x.shape[0], -1)

    def reach(self, w: torch.Tensor) -> int:
        """How many of a source layer's target slices (its own first) are written: all, or 1 + neighbours."""
        n = self.cfg.neighbours
        return w.shape[1] if n is None else min(w.shape[1], n + 1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        T, S, Do = latents.shape[0], self.cfg.n_sites, self.cfg.out_dim // self.cfg.n_sites
        per_layer = latents.view(T, S, -1)
        out = latents.new_zeros(T, S * Do)
        for i, w in enumerate(self.W_dec):
            r = self.reach(w)
            out[:, i * Do:(i + r) * Do] += per_layer[:, i] @ w[:, :r].reshape(w.shape[0], -1)
        return out

    def decoder_norms(self) -> torch.Tensor:
        return torch.cat([w.flatten(1).norm(dim=1) for w in self.W_dec])

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        for w in self.W_dec:
            w.div_(w.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None])

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        for w in self.W_dec:
            if w.grad is not None:
                w.grad -= (w.grad * w).sum((1, 2), keepdim=True) * w

    @torch.no_grad()
    def folded(self) -> CrossLayerTranscoder:
        s, t = self._fold_check()
        S = self.cfg.n_sites
        new = CrossLayerTranscoder(self.cfg, device=self.W_enc.device, dtype=self.W_enc.dtype)
        new.load_state_dict(self.state_dict())
        new.W_enc.mul_(s.view(S, -1)[:, :, None])
        t_layers = t.view(S, -1)
        for i, w in enumerate(new.W_dec):
            w.div_(t_layers[i:][None])
        new.b_dec.div_(t)
        new.input_scale.fill_(1.0)
        new.target_scale.fill_(1.0)
        return new


Coder = SparseCoder | CrossLayerTranscoder


def build_coder(cfg: CoderConfig, *, device=None, dtype=None) -> Coder:
    cls = CrossLayerTranscoder if cfg.cross_layer else SparseCoder
    return cls(cfg, device=device, dtype=dtype)
