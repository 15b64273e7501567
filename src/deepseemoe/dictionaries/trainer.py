"""Train sparse coders from a stream of activations, through a shuffle buffer, resumably.

Shapes: every stream item is {name: (source [T, D_in], target [T, D_out])}; the buffer holds
[N, D_in + D_out] rows per coder; a training batch is [B, ·].

Many coders train from one forward pass (one stream item feeds all of them). The buffer lives
on the coder's device, so the model can sit elsewhere (`--model-device` / `--coder-device`).
A checkpoint holds the coders, optimizers, buffers, RNG state and the number of stream items
consumed, so `resume` continues with exactly the batches an uninterrupted run would have seen
(given a deterministic stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deepseemoe.dictionaries.coder import SparseCoder
from deepseemoe.dictionaries.losses import auxk_loss, fvu, sparsity_penalty


@dataclass
class TrainConfig:
    batch_size: int = 4096  # tokens per optimizer step
    buffer_size: int = 65_536  # tokens held for shuffling, per coder
    lr: float | None = None  # None: 2e-4 / sqrt(F / 16384), sparsify's scaling rule
    auxk_alpha: float = 1 / 32
    dead_after_tokens: int = 1_000_000  # a latent that has not fired for this many tokens is dead
    sparsity_coef: float = 0.0  # ReLU: L1 coefficient; JumpReLU: L0 coefficient
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


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
        keep = torch.ones(self.fill, dtype=torch.bool, device=self.device)
        keep[pick] = False
        rest = self.data[: self.fill][keep]
        self.fill = rest.shape[0]
        self.data[: self.fill] = rest
        return out

    def state(self) -> dict:
        return {"data": None if self.data is None else self.data[: self.fill].cpu(), "fill": self.fill}

    def load(self, state: dict) -> None:
        self.fill = 0
        self.data = None
        if state["data"] is not None and state["fill"]:
            self.add(state["data"])


class CoderTrainer:
    """Trains a set of named coders on streamed (source, target) activations."""

    def __init__(self, coders: dict[str, SparseCoder], cfg: TrainConfig):
        self.coders, self.cfg = coders, cfg
        self.optimizers = {}
        for name, coder in coders.items():
            coder.to(cfg.device).train()
            lr = cfg.lr or 2e-4 / math.sqrt(coder.cfg.n_latents / 16384)
            self.optimizers[name] = torch.optim.Adam(coder.parameters(), lr=lr, betas=(0.9, 0.999))
        self.buffers = {name: _Buffer(cfg.buffer_size, cfg.device) for name in coders}
        self.since_fired = {name: torch.zeros(c.cfg.n_latents, dtype=torch.long, device=cfg.device)
                            for name, c in coders.items()}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.tokens = 0
        self.items_consumed = 0
        self.metrics: list[dict] = []

    def _train_step(self, name: str, batch: torch.Tensor) -> dict:
        coder, opt = self.coders[name], self.optimizers[name]
        d_in = coder.cfg.d_in
        x, y = batch[:, :d_in], batch[:, d_in:]
        out = coder(x)
        loss_fvu = fvu(y, out.out)
        loss = loss_fvu + self.cfg.sparsity_coef * sparsity_penalty(coder, out)
        fired = (out.latents > 0).any(0)
        self.since_fired[name] += x.shape[0]
        self.since_fired[name][fired] = 0
        dead = self.since_fired[name] >= self.cfg.dead_after_tokens
        aux = torch.zeros((), device=x.device)
        if coder.cfg.activation in ("topk", "batchtopk") and bool(dead.any()):
            aux = auxk_loss(coder, y, out, dead, k_aux=min(coder.cfg.n_latents // 2, 2 * coder.cfg.k))
            loss = loss + self.cfg.auxk_alpha * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows unit-norm: remove the gradient along each row first
            if coder.cfg.activation in ("topk", "batchtopk"):
                w = coder.W_dec
                w.grad -= (w.grad * w).sum(1, keepdim=True) * w
        opt.step()
        with torch.no_grad():
            if coder.cfg.activation in ("topk", "batchtopk"):
                coder.W_dec.div_(coder.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            if coder.cfg.activation == "batchtopk":
                coder.update_batchtopk_threshold(out.latents.detach())
        return {"coder": name, "step": self.step, "fvu": float(loss_fvu), "auxk": float(aux),
                "l0": float((out.latents > 0).sum(-1).float().mean()), "dead": float(dead.float().mean())}

    def fit(self, stream: Iterable[dict[str, tuple[torch.Tensor, torch.Tensor]]], *, max_steps: int,
            checkpoint: str | Path | None = None, checkpoint_every: int = 0, progress: bool = False) -> None:
        """Consume the stream until `max_steps` optimizer steps; a resumed trainer first skips the
        stream items it had already consumed."""
        iterator: Iterator = iter(stream)
        for _ in range(self.items_consumed):
            next(iterator)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("FVU {task.fields[fvu]:.3f} · L0 {task.fields[l0]:.1f}"), disable=not progress) as bar:
            task = bar.add_task("train", total=max_steps, completed=self.step, fvu=float("nan"), l0=0.0)
            while self.step < max_steps:
                if all(b.fill >= self.cfg.batch_size for b in self.buffers.values()) and \
                        min(b.fill for b in self.buffers.values()) >= min(self.cfg.buffer_size // 2,
                                                                          self.cfg.batch_size):
                    for name, buf in self.buffers.items():
                        self.metrics.append(self._train_step(name, buf.take(self.cfg.batch_size, self.generator)))
                    self.step += 1
                    self.tokens += self.cfg.batch_size
                    bar.update(task, completed=self.step, fvu=self.metrics[-1]["fvu"], l0=self.metrics[-1]["l0"])
                    if checkpoint and checkpoint_every and self.step % checkpoint_every == 0:
                        self.save(checkpoint)
                    continue
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                self.items_consumed += 1
                for name, (src, tgt) in item.items():
                    if name in self.buffers:
                        self.buffers[name].add(torch.cat([src.float(), tgt.float()], dim=1))

    def state_dict(self) -> dict:
        return {"coders": {n: c.state_dict() for n, c in self.coders.items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "buffers": {n: b.state() for n, b in self.buffers.items()},
                "since_fired": self.since_fired, "generator": self.generator.get_state(),
                "step": self.step, "tokens": self.tokens, "items_consumed": self.items_consumed,
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        for n, c in self.coders.items():
            c.load_state_dict(state["coders"][n])
            self.optimizers[n].load_state_dict(state["optimizers"][n])
            self.buffers[n].load(state["buffers"][n])
        self.since_fired = {n: t.to(self.cfg.device) for n, t in state["since_fired"].items()}
        self.generator.set_state(state["generator"])
        self.step, self.tokens, self.items_consumed = state["step"], state["tokens"], state["items_consumed"]

    def save(self, path: str | Path) -> None:
        """Atomic checkpoint (temp file + rename)."""
        import os
        import tempfile

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def resume(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, weights_only=False))
