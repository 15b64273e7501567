"""`deepseemoe route`: run a corpus through a model and store every token's routing.

Shapes: batches [B, S] → kept tokens T per batch (padding and BOS dropped) → routing [T, K]
per MoE layer, written as long-format rows into a routing run (runs/routing.py).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

from deepseemoe.capture.consumers import RoutingRecorder
from deepseemoe.capture.core import run_capture
from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.token_text import token_texts
from deepseemoe.data.tokens import pack_documents
from deepseemoe.distributed import World
from deepseemoe.errors import DeepSeeMoEError, failure_line
from deepseemoe.models.handle import ModelHandle
from deepseemoe.runs.routing import RoutingRunWriter


@dataclass
class RouteResult:
    run_dir: Path
    tokens: int
    seconds: float
    layers: list[int]
    resumed_tokens: int = 0  # of `tokens`, kept from an interrupted run (`--resume`)
    peak_gpu_gb: float | None = None  # this process's peak CUDA memory, when the model is on a GPU

    @property
    def tokens_per_second(self) -> float:
        """Tokens routed by this command (all ranks) per second of it."""
        return (self.tokens - self.resumed_tokens) / max(self.seconds, 1e-9)


def versions() -> dict[str, str]:
    import torch
    import transformers

    import deepseemoe

    return {"deepseemoe": deepseemoe.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def moe_layout(handle: ModelHandle) -> dict:
    return {"model": handle.name, "model_type": handle.model_type, "num_layers": handle.num_layers,
            "moe_layers": {str(i): {"num_experts": m.num_experts, "top_k": m.top_k, "router_family": m.router_family,
                                    "combine": m.combine, "block": m.block_path}
                           for i, m in sorted(handle.moe_layers.items())}}


def route_settings(handle: ModelHandle, source: TextSource, run_dir: Path, *, ctx_len: int, batch_size: int,
                   max_tokens: int | None, logits: bool, exclude_bos: bool, world: World) -> dict:
    """What a routing run's content depends on: every rank must be started with the same, and
    `--resume` keeps an interrupted run's shards only under the same. The model is named by its
    name and a digest of its config (hashing a 40 GB checkpoint on every rank would cost minutes)."""
    import hashlib

    config = hashlib.sha256(handle.model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return {"out": str(run_dir.resolve()), "model": handle.name, "model_config": config, "data": source.describe(),
            "ctx_len": ctx_len, "batch_size": batch_size, "max_tokens": max_tokens, "exclude_bos": exclude_bos,
            "logits": logits, "ranks": world.size}


def route_corpus(handle: ModelHandle, source: TextSource, run_dir: str | Path, *, ctx_len: int | None = None,
                 batch_size: int = 8, max_tokens: int | None = None, logits: bool = False,
                 exclude_bos: bool = True, shard_tokens: int = 1_000_000, progress: bool = True,
                 extra: dict | None = None, overwrite: bool = False, buffer_gb: float = 2.0,
                 resume: bool = False, world: World | None = None, rank_split: str = "contexts") -> RouteResult:
    """Capture the routing of every kept token of `source` in every MoE layer into `run_dir`.

    The run appears whole or not at all; an existing routing run there is replaced (only with
    `overwrite`) when the new one is complete. `resume` keeps the shards a killed run finished
    (with the same settings) and routes only the rest.

    Under torchrun (`world` of N ranks), `rank_split="contexts"`: every rank packs the same stream of
    contexts and routes every N-th batch of it, so each forward pass is the one a single process
    would run: the run holds the same tokens, routing and weights per (doc, pos) as with one
    process, in other shards. `rank_split="documents"`: each rank reads only its share of the
    documents (`iter_documents(part=…)`; a streamed source is split by datasets, so no rank
    downloads the others' share) and packs its own contexts: the same tokens per document, but
    documents share contexts with other neighbours than in one process, so routing, which depends
    on the context through attention, differs. `max_tokens` is then a total, ⌈max_tokens / N⌉ a rank."""
    world = world or World()
    if rank_split not in ("contexts", "documents"):
        raise DeepSeeMoEError(f"--rank-split {rank_split} is not one of contexts, documents")
    by_documents = rank_split == "documents" and world.size > 1
    if not handle.is_moe:
        raise DeepSeeMoEError(f"{handle.name} has no MoE layers, so there is no routing to record; "
                              "use a Mixture-of-Experts model")
    if handle.tokenizer is None:
        raise DeepSeeMoEError(f"{handle.name} has no tokenizer; save one next to the model (tokenizer.json)")
    run_dir = Path(run_dir)
    ctx_len = handle.check_ctx_len(ctx_len)
    layers = sorted(handle.moe_layers)
    recorder = RoutingRecorder(layers, logits=logits)
    tokenizer = handle.tokenizer
    share = None if max_tokens is None else -(-max_tokens // world.size)
    documents = iter_documents(source, part=(world.rank, world.size)) if by_documents else iter_documents(source)
    batches = pack_documents(tokenizer, documents, ctx_len=ctx_len, batch_size=batch_size,
                             max_tokens=share if by_documents else max_tokens)
    settings = {**route_settings(handle, source, run_dir, ctx_len=ctx_len, batch_size=batch_size,
                                 max_tokens=max_tokens, logits=logits, exclude_bos=exclude_bos, world=world),
                "rank_split": rank_split}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    label = "routing" if world.size == 1 else f"routing (rank 0 of {world.size}, its share)"
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TextColumn("{task.fields[rate]:>8.0f} tok/s"), TimeElapsedColumn()]
    with RoutingRunWriter(run_dir, overwrite=overwrite, shard_tokens=shard_tokens, logits=logits,
                          buffer_gb=buffer_gb, world=world, resume=resume, settings=settings) as writer, \
            Progress(*columns, disable=not (progress and world.main), transient=False) as bar:
        start = time.perf_counter()
        kept = writer.total_tokens  # this rank's tokens kept from an interrupted run
        task = bar.add_task("route", total=share, completed=kept, rate=0.0)
        failure, seen = None, 0
        try:
            for index, packed in enumerate(batches):
                seen = index + 1
                if not (by_documents or world.mine(index)) or index < writer.next_batch:
                    continue  # another rank's batch, or one a killed run already wrote
                keep_mask = packed.keep if exclude_bos else packed.attention_mask.bool().reshape(-1)
                batch = run_capture(handle, packed.input_ids, [recorder], attention_mask=packed.attention_mask,
                                    keep=keep_mask)
                rec = recorder.batches.pop()
                mask = batch.mask.cpu().numpy()
                doc = packed.doc.reshape(-1).numpy()[mask]
                pos = packed.pos.reshape(-1).numpy()[mask]
                token_ids = batch.token_ids.cpu().numpy()
                pieces = tokenizer.convert_ids_to_tokens(token_ids.tolist())
                writer.add(doc, pos, token_ids, token_texts(tokenizer, token_ids.tolist()),
                           [packed.domains.get(int(d)) for d in doc],
                           {i: rec["idx"][i].numpy() for i in layers}, {i: rec["weights"][i].numpy() for i in layers},
                           {i: rec["logits"][i].numpy() for i in layers} if logits else None, pieces=pieces,
                           batch=index)
                elapsed = time.perf_counter() - start
                bar.update(task, advance=int(mask.sum()), rate=(writer.total_tokens - kept) / max(elapsed, 1e-9))
        except Exception as exc:  # under torchrun: carried to the commit, where rank 0 reports it once
            if world.size == 1:
                raise
            failure = failure_line(exc)[0]
        seconds = time.perf_counter() - start
        if world.size == 1 and writer.total_tokens == 0:
            raise DeepSeeMoEError(f"no tokens were routed from {source.spec}; check the length filters and the field")
        meta = {**moe_layout(handle), "data": source.describe(), "ctx_len": ctx_len, "batch_size": batch_size,
                "max_tokens": max_tokens, "exclude_bos": exclude_bos, "logits": logits,
                "seconds": round(seconds, 3), "versions": versions(), **(extra or {})}
        if world.size > 1:
            meta["rank_split"] = rank_split
        writer.commit(meta, failure=failure, batches=None if by_documents else seen)
    device = next(handle.model.parameters()).device
    peak = None
    if device.type == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated(device) / 1e9
    return RouteResult(run_dir, writer.run_tokens, seconds, layers, resumed_tokens=writer.resumed_tokens,
                       peak_gpu_gb=peak)
