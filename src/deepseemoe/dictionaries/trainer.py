"""Train sparse coders from a stream of activations, through a shuffle buffer, resumably.

Shapes: every stream item is {name: (source [T, D_in], target [T, D_out])}; the buffer holds
[N, D_in + D_out] rows per coder; a training batch is [B, ·].

Many coders train from one forward pass (one stream item feeds all of them). The buffer lives
on the coder's device, so the model can sit elsewhere (`--model-device` / `--coder-device`).
A checkpoint holds the coders, optimizers, buffers, RNG state and the number of stream items
consumed, so `resume` continues with exactly the batches an uninterrupted run would have seen
(given a deterministic stream).

Data parallel (torchrun): every rank feeds its own stream and takes batch_size / world rows per
step; the loss is the FVU of the *global* batch (numerators local, the target variance
all-reduced), and gradients are summed across ranks, so the update equals one process training
on the union of the ranks' batches (exactly for TopK, ReLU and JumpReLU; BatchTopK picks its k·B
largest per rank).

Sparsity of ReLU and JumpReLU coders: the loss adds coef · penalty (ReLU: L1 weighted by decoder
norms; JumpReLU: expected L0). A coder without a fixed coefficient (`sparsity_coef` unset, the
default) has it steered toward L0 = its `k`, as TopK coders get L0 = k by construction: after every
step log(coef) += SPARSITY_RATE · clamp(log((L0 + 1) / (k + 1)), −1, 1), starting at
SPARSITY_START. JumpReLU thresholds start where each latent fires on a share k / F of the first
buffer's rows (so L0 starts near k, not near F/2: the threshold's own gradient is far too small
to walk there from 1e-3 in a short run). A fixed coefficient (per coder, or `TrainConfig.sparsity_coef` for all) turns the
steering off. The coefficient is checkpointed, so resume stays exact.

Input normalisation ("mean_norm"): before the first step each site of the source and target is
scaled so its mean norm is √D_site (estimated on the first full buffer); `folded()` undoes it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deepseemoe.dictionaries.checkpoint import load_checkpoint, save_checkpoint
from deepseemoe.dictionaries.coder import Coder, SparseCoder
from deepseemoe.dictionaries.losses import auxk_loss, sparsity_penalty
from deepseemoe.errors import DeepSeeMoEError, keep


@dataclass
class TrainConfig:
    batch_size: int = 4096  # tokens per optimizer step
    buffer_size: int = 65_536  # tokens held for shuffling, per coder
    # None: LR_AT_16K / sqrt(F / 16384): sparsify's width scaling, 8× its Adam base rate (and no
    # warm-up), chosen with bench/time_to_fvu.py (see LR_AT_16K)
    lr: float | None = None
    auxk_alpha: float = 1 / 32
    # a latent that has not fired for this many tokens is dead (and AuxK trains it). sparsify's 10M: on the
    # demo MoE's block input (TopK, F=4096, k=32, 1,200 steps) 1M made a third of the latents "dead" by
    # the end and AuxK cost 25% more time for the same held-out FVU (0.0140 either way)
    dead_after_tokens: int = 10_000_000
    # ReLU: L1 coefficient; JumpReLU: L0 coefficient, for every ReLU/JumpReLU coder without its own;
    # None: each is steered toward L0 = its k (module docstring)
    sparsity_coef: float | None = None
    normalize: str = "mean_norm"  # "mean_norm": scale each site to mean norm √D first; "none"
    seed: int = 0
    device: str = "cpu"
    autocast: bool = True  # bf16 autocast of the coder forward on CUDA (fp32 master weights)

    def to_dict(self) -> dict:
        return asdict(self)


# Adam's default learning rate, chosen with bench/time_to_fvu.py on this project's 2-core CPU machine
# (TopK, batch 4096, 30 s per run, 2 repeats, against sparsify's own trainer at its defaults): at
# sparsify's Adam rate 2e-4/sqrt(F/16384) our final FVU on the demo MoE's block input was 0.042
# against sparsify's 0.024; at 4× it was 0.024, at 8× 0.020 (sparsify's 0.024 reached 1.5× sooner).
# 8× also gave the best final FVU on the residual stream (0.016 vs sparsify's 0.019), the block
# output (0.005 vs 0.007) and planted features at D=512/F=16k (0.147, was 0.177) and D=1024/F=32k
# (0.192, was 0.205).
LR_AT_16K = 1.6e-3


def default_lr(n_latents: int) -> float:
    """Adam's learning rate for a dictionary of `n_latents` when TrainConfig.lr is None."""
    return LR_AT_16K / math.sqrt(n_latents / 16384)


class _Buffer:
    def __init__(self, size: int, device):
        self.size, self.device = size, torch.device(device)
        self.data: torch.Tensor | None = None
        self.fill = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device, torch.float32)
        if self.data is None:
            self.data = torch.empty(self.size + rows.shape[0], rows.shape[1], device=self.device)
        if self.fill + rows.shape[0] > self.data.shape[0]:
            grown = torch.empty(self.fill + rows.shape[0], rows.shape[1], device=self.device)
            grown[: self.fill] = self.data[: self.fill]
            self.data = grown
        self.data[self.fill: self.fill + rows.shape[0]] = rows
        self.fill += rows.shape[0]

    def take(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n random rows, removed from the buffer (swap-remove keeps it compact)."""
        pick = torch.randperm(self.fill, generator=generator)[:n].to(self.device)
        out = self.data[pick].clone()
        # fill the holes left below the new end with the unpicked rows above it: O(n), not O(buffer)
        end = self.fill - len(pick)
        taken = torch.zeros(self.fill, dtype=torch.bool, device=self.device)
        taken[pick] = True
        holes = pick[pick < end]
        movers = torch.arange(end, self.fill, device=self.device)[~taken[end:]]
        self.data[holes] = self.data[movers]
        self.fill = end
        return out

    def state(self) -> dict:
        return {"data": None if self.data is None else self.data[: self.fill].cpu(), "fill": self.fill}

    def load(self, state: dict) -> None:
        self.fill = 0
        self.data = None
        if state["data"] is not None and state["fill"]:
            self.add(state["data"])


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


SPARSITY_START = 1e-3  # the steered coefficient's first value
SPARSITY_RATE = 0.05  # its largest change of log(coef) per step (×1.05)


class CoderTrainer:
    """Trains a set of named coders on streamed (source, target) activations."""

    def __init__(self, coders: dict[str, Coder], cfg: TrainConfig, data_parallel: bool = True,
                 sparsity_coefs: dict[str, float | None] | None = None):
        """`data_parallel=False` under torchrun: this rank trains its own coders on the full
        stream (coders split across ranks) — no collectives, files still named per rank.
        `sparsity_coefs`: a fixed coefficient per ReLU/JumpReLU coder (None or absent: the run's
        `cfg.sparsity_coef`, else steered toward L0 = k)."""
        if cfg.normalize not in ("mean_norm", "none"):
            raise DeepSeeMoEError(f"unknown normalize={cfg.normalize!r}; use 'mean_norm' or 'none'")
        self.file_rank, self.file_world = _dist()
        self.rank, self.world = (self.file_rank, self.file_world) if data_parallel else (0, 1)
        if cfg.batch_size % self.world:
            raise DeepSeeMoEError(f"batch_size {cfg.batch_size} must divide by the {self.world} ranks")
        self.local_batch = cfg.batch_size // self.world
        self.coders, self.cfg = coders, cfg
        self.optimizers = {}
        for name, coder in coders.items():
            coder.to(cfg.device).train()
            lr = cfg.lr or default_lr(coder.cfg.n_latents)
            # fused: one pass over each tensor instead of about ten (D=1024, F=32k on 2 CPU cores: 31 ms a
            # step against 217 ms); the same update up to the last bit of float rounding
            fused = torch.device(cfg.device).type in ("cpu", "cuda") or None
            self.optimizers[name] = torch.optim.Adam(coder.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused)
        self.buffers = {name: _Buffer(cfg.buffer_size, cfg.device) for name in coders}
        self.since_fired = {name: torch.zeros(c.cfg.n_latents, dtype=torch.long, device=cfg.device)
                            for name, c in coders.items()}
        # one generator per coder: a coder's batches do not depend on which coders train beside it
        self.generators = {name: torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode())
                                                               + 7919 * self.rank) for name in coders}
        self.normalized = cfg.normalize == "none"
        fixed = {n: (sparsity_coefs or {}).get(n) for n in coders}
        self.sparsity_fixed = {n: (v if v is not None else cfg.sparsity_coef) for n, v in fixed.items()}
        # log of the steered coefficient, for the ReLU/JumpReLU coders without a fixed one
        self.log_sparsity = {n: math.log(SPARSITY_START) for n, c in coders.items()
                             if c.cfg.activation in ("relu", "jumprelu") and self.sparsity_fixed[n] is None}
        self.thresholds_set = False
        self.step = 0
        self.tokens = 0
        self.items_consumed = 0
        self.metrics: list[dict] = []

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def _global_variance(self, coder: Coder, y: torch.Tensor) -> torch.Tensor:
        """Σ over the global batch of ‖y_site − mean(y_site)‖², per target site [S]."""
        y = y.detach().double()  # Σy² − (Σy)²/n cancels badly in fp32 when the mean is large
        sq = torch.stack([y[:, b].pow(2).sum() for b in coder.site_slices()] + [y.new_tensor(y.shape[0])])
        col_sums = torch.stack([y[:, b].sum(0) for b in coder.site_slices()])  # [S, D_site]
        self._all_reduce(sq)
        self._all_reduce(col_sums)
        return (sq[:-1] - col_sums.pow(2).sum(1) / sq[-1]).float()

    def _fvu(self, coder: Coder, y: torch.Tensor, recon: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        resid = torch.stack([(y[:, b] - recon[:, b]).pow(2).sum() for b in coder.site_slices()])
        return (resid / variance.clamp_min(torch.finfo(variance.dtype).tiny)).mean()

    @torch.no_grad()
    def _set_scales(self) -> None:
        """Per-site scale to mean norm √D_site, from the buffers' current rows (all ranks)."""
        for name, coder in self.coders.items():
            rows = self.buffers[name].data[: self.buffers[name].fill]
            d_in = coder.cfg.d_in
            for which, scale, cols in (("source", coder.input_scale, rows[:, :d_in]),
                                       ("target", coder.target_scale, rows[:, d_in:])):
                for b in coder.site_slices(which):
                    stats = torch.stack([cols[:, b].norm(dim=1).sum(), cols.new_tensor(cols.shape[0])])
                    self._all_reduce(stats)
                    mean_norm = float(stats[0] / stats[1])
                    width = b.stop - b.start
                    scale[b] = width**0.5 / mean_norm if mean_norm > 0 else 1.0
            if not coder.cfg.is_transcoder:
                coder.target_scale.copy_(coder.input_scale)
        self.normalized = True

    def _init_rows(self, name: str, limit: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) rows of `name`'s buffer the data-dependent start is computed on: at most
        `limit`, and no more than one batch (or 1024) so a wide coder's forward stays a batch's size."""
        buf = self.buffers[name]
        rows = buf.data[: min(buf.fill, limit, max(self.local_batch, 1024))]
        d_in = self.coders[name].cfg.d_in
        return rows[:, :d_in], rows[:, d_in:]

    @torch.no_grad()
    def _init_from_data(self) -> None:
        """Before the first step, from the buffer (sums over ranks), so training starts at FVU ≤ 1
        instead of over-reconstructing from the decoder-transpose init:
        1. b_dec = the mean target; a transcoder's encoder is centred too (b_enc = −mean(x)·W_enc,
           as sparsify does; an SAE's encoder input already subtracts b_dec);
        2. JumpReLU thresholds (`_init_thresholds`);
        3. the encoder (and thresholds) scaled by the least-squares factor c = ⟨r, a⟩ / ⟨a, a⟩ between
           the centred target r and the latents' initial reconstruction a — every activation here is
           positively homogeneous once its threshold scales with it."""
        for name, coder in self.coders.items():
            x, y = self._init_rows(name)
            target = y * coder.target_scale
            sums = self._all_reduce(torch.cat([target.sum(0), (x * coder.input_scale).sum(0),
                                               target.new_tensor([len(target)])]))
            n = sums[-1]
            coder.b_dec.copy_(sums[: target.shape[1]] / n)
            if coder.cfg.is_transcoder and isinstance(coder, SparseCoder):
                coder.b_enc.copy_(-(sums[target.shape[1]:-1] / n) @ coder.W_enc)
        self._init_thresholds()
        for name, coder in self.coders.items():
            # one scalar to fit: 1024 rows pin it down, and at D=1024, F=32k a 4096-row forward costs
            # about 1.5 s on 2 CPU cores before the first step (bench/time_to_fvu.py)
            x, y = self._init_rows(name, limit=1024)
            target = y * coder.target_scale - coder.b_dec
            recon = coder(x).out * coder.target_scale - coder.b_dec  # the latents' part (W_skip starts at 0)
            dots = self._all_reduce(torch.stack([(target * recon).sum(), recon.pow(2).sum()]))
            if float(dots[1]) > 0 and float(dots[0]) > 0:
                c = float(dots[0] / dots[1])
                coder.W_enc.mul_(c)
                coder.b_enc.mul_(c)
                if coder.log_threshold is not None:
                    coder.log_threshold.add_(math.log(c))
                if coder.threshold is not None:
                    coder.threshold.mul_(c)

    @torch.no_grad()
    def _init_thresholds(self) -> None:
        """JumpReLU: each latent's threshold at the (1 − k/F_group) quantile of its pre-activations on
        the buffer (averaged over ranks), never below the configured initial threshold."""
        for name, coder in self.coders.items():
            if coder.cfg.activation != "jumprelu":
                continue
            pre = coder(self._init_rows(name)[0]).pre.float()
            share = min(1.0, coder.cfg.k / coder.cfg.latents_per_group)
            q = torch.quantile(pre, 1 - share, dim=0) if share < 1 else pre.min(0).values
            q = self._all_reduce(q.contiguous()) / self.world
            coder.log_threshold.copy_(q.clamp_min(coder.cfg.jumprelu_init_threshold).log())
        self.thresholds_set = True

    def _train_step(self, name: str, batch: torch.Tensor) -> dict:
        coder, opt = self.coders[name], self.optimizers[name]
        d_in = coder.cfg.d_in
        x, y = batch[:, :d_in], batch[:, d_in:]
        variance = self._global_variance(coder, y)
        use_autocast = self.cfg.autocast and x.device.type == "cuda"
        # a ternary coder runs forward and backward on its ternary weights, steps its float ones
        with coder.ternary_weights():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                out = coder(x)
            recon = out.out.float()
            loss_fvu = self._fvu(coder, y, recon, variance)
            coef = self.sparsity_coef(name)
            if coef:
                loss = loss_fvu + coef * sparsity_penalty(coder, out) / self.world
            else:
                loss = loss_fvu
            fired = out.fired()
            self._all_reduce(fired, op="max")
            self.since_fired[name] += self.cfg.batch_size
            self.since_fired[name][fired.bool()] = 0
            dead = self.since_fired[name] >= self.cfg.dead_after_tokens
            aux = torch.zeros((), device=x.device)
            if coder.cfg.activation in ("topk", "batchtopk") and bool(dead.any()):
                aux = auxk_loss(coder, y, out, dead, k_aux=min(coder.cfg.n_latents // 2, 2 * coder.cfg.k),
                                normalized=lambda r, rec: self._fvu(coder, r, rec, self._global_variance(coder, r)))
                loss = loss + self.cfg.auxk_alpha * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if self.world > 1:
            for p in coder.parameters():
                if p.grad is not None:
                    self._all_reduce(p.grad)
        unit_decoder = coder.cfg.activation in ("topk", "batchtopk")
        if unit_decoder:  # keep decoder rows unit-norm: remove the gradient along each row first
            coder.remove_parallel_grad_()
        opt.step()
        if unit_decoder:
            coder.normalize_decoder_()
        if coder.cfg.activation == "batchtopk":
            coder.update_batchtopk_threshold(out)
        logged = self._all_reduce(torch.stack([loss_fvu.detach(), out.l0().detach() / self.world, aux.detach()]))
        l0 = float(logged[1])
        if name in self.log_sparsity:  # every rank sees the same global L0, so the coefficients agree
            target = coder.cfg.k * coder.cfg.groups  # k per group (a CLT's source layer); l0 counts all groups
            error = math.log((l0 + 1) / (target + 1))
            self.log_sparsity[name] += SPARSITY_RATE * max(-1.0, min(1.0, error))
        return {"coder": name, "step": self.step, "fvu": float(logged[0]), "auxk": float(logged[2]),
                "l0": l0, "dead": float(dead.float().mean()), "sparsity_coef": coef}

    def sparsity_coef(self, name: str) -> float:
        """The coefficient of `name`'s sparsity penalty at this step (0 for TopK/BatchTopK)."""
        if name in self.log_sparsity:
            return math.exp(self.log_sparsity[name])
        return self.sparsity_fixed[name] or 0.0

    def fit(self, stream: Iterable[dict[str, tuple[torch.Tensor, torch.Tensor]]], *, max_steps: int,
            checkpoint: str | Path | None = None, checkpoint_every: int = 0, progress: bool = False,
            on_step: Callable[[list[dict]], None] | None = None) -> None:
        """Consume the stream until `max_steps` optimizer steps; a resumed trainer first skips the
        stream items it had already consumed."""
        iterator: Iterator = iter(stream)
        for _ in range(self.items_consumed):
            next(iterator)
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        start, start_tokens = time.perf_counter(), self.tokens
        exhausted = False
        # the bar's FVU is held out: each step's FVU is measured on its batch before the update, and the
        # shuffle buffer hands out every streamed row once, so no row was trained on before it is scored
        with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[tps]:,.0f} tok/s · held-out FVU {task.fields[fvu]:.3f} · "
                                 "L0 {task.fields[l0]:.1f}"),
                      disable=not progress) as bar:
            task = bar.add_task("train", total=max_steps, completed=self.step, fvu=float("nan"), l0=0.0, tps=0.0)
            while self.step < max_steps:
                # mix: step only once the buffer is half full (the tokens of one forward are far from
                # i.i.d.); when the stream has run out, drain what is left
                need = self.local_batch if exhausted else max(self.local_batch, self.cfg.buffer_size // 2)
                ready = all(b.fill >= need for b in self.buffers.values())
                stop = exhausted
                if self.world > 1:  # every rank steps together, or none does; one rank's end ends all
                    flags = self._all_reduce(torch.tensor([0 if ready else 1, int(exhausted)], device=self.cfg.device),
                                             op="max")
                    ready, stop = int(flags[0]) == 0, int(flags[1]) == 1
                if ready:
                    if not self.normalized:
                        self._set_scales()
                    if not self.thresholds_set:
                        self._init_from_data()
                    step_metrics = [self._train_step(name, buf.take(self.local_batch, self.generators[name]))
                                    for name, buf in self.buffers.items()]
                    self.metrics += step_metrics
                    self.step += 1
                    self.tokens += self.cfg.batch_size
                    tps = (self.tokens - start_tokens) / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=self.step, fvu=self.metrics[-1]["fvu"], l0=self.metrics[-1]["l0"], tps=tps)
                    if on_step is not None:
                        on_step([{**m, "tokens": self.tokens, "tokens_per_s": tps} for m in step_metrics])
                    if checkpoint and checkpoint_every and self.step % checkpoint_every == 0:
                        self.save(checkpoint)
                    continue
                if stop:
                    break
                try:
                    item = next(iterator)
                except StopIteration:
                    exhausted = True
                    continue
                self.items_consumed += 1
                for name, (src, tgt) in item.items():
                    if name in self.buffers:
                        self.buffers[name].add(torch.cat([src.float(), tgt.float()], dim=1))

    def state_dict(self) -> dict:
        return {"coders": {n: c.state_dict() for n, c in self.coders.items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "buffers": {n: b.state() for n, b in self.buffers.items()},
                "since_fired": self.since_fired, "generators": {n: g.get_state() for n, g in self.generators.items()},
                "normalized": self.normalized, "thresholds_set": self.thresholds_set, "rank": self.file_rank, "world": self.file_world,
                "step": self.step, "tokens": self.tokens, "items_consumed": self.items_consumed,
                "log_sparsity": {n: torch.tensor(v, dtype=torch.float64) for n, v in self.log_sparsity.items()},
                # BatchTopK's first candidate width: the same width sums the same terms in the same order
                "batch_width": {n: torch.tensor(getattr(c, "batch_width", 0)) for n, c in self.coders.items()},
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        for n, c in self.coders.items():
            c.load_state_dict(state["coders"][n])
            self.optimizers[n].load_state_dict(state["optimizers"][n])
            self.buffers[n].load(state["buffers"][n])
        self.since_fired = {n: t.to(self.cfg.device) for n, t in state["since_fired"].items()}
        for n, g in self.generators.items():
            g.set_state(state["generators"][n])
        self.normalized = state["normalized"]
        self.thresholds_set = state.get("thresholds_set", True)
        for n, v in state.get("batch_width", {}).items():
            if n in self.coders and hasattr(self.coders[n], "batch_width"):
                self.coders[n].batch_width = int(v)
        for n, v in state.get("log_sparsity", {}).items():
            if n in self.log_sparsity:
                self.log_sparsity[n] = float(v)
        self.step, self.tokens, self.items_consumed = state["step"], state["tokens"], state["items_consumed"]

    def _rank_path(self, path: str | Path) -> Path:
        """Rank 0 writes `path`; under torchrun every other rank its own buffers beside it."""
        path = Path(path)
        r = self.file_rank
        return path if r == 0 else path.with_name(f"{path.stem}.rank{r}{path.suffix}")

    def save(self, path: str | Path) -> None:
        """Atomic checkpoint without pickle (dictionaries/checkpoint.py)."""
        save_checkpoint(self._rank_path(path), self.state_dict())
        keep("train", f"the checkpoint of step {self.step} is kept in {path}: continue with --resume")

    def resume(self, path: str | Path) -> None:
        path = self._rank_path(path)
        if not path.exists():
            raise DeepSeeMoEError(f"no checkpoint at {path}; start without --resume")
        state = load_checkpoint(path)
        if state.get("world", 1) != self.file_world:
            raise DeepSeeMoEError(f"checkpoint {path} was written by {state.get('world', 1)} ranks, this run has "
                                  f"{self.file_world}; resume with the same number of processes")
        self.load_state_dict(state)
