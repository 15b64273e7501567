"""Train the demo MoE and its dense twin on the same token stream, side by side.

Shapes: windows [N, S] int64 (each from one domain, so every token has a clean domain label);
a batch [B, S] is both input and labels (Hugging Face shifts the labels itself).

The two models train in two processes with one thread each: at this size two 1-thread runs
give more total throughput than one 2-thread run (demo-feasibility.md §3). Both draw the same
batches (same seed), save intermediate checkpoints for router saturation, and are written with
`save_pretrained`, so they load exactly like hub models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_json, read_json
from deepseemoe.zoo.recipes import Recipe, dense_config, get_recipe, moe_config, ternary_parts
from deepseemoe.zoo.tokenizer import read_jsonl, train_tokenizer


@dataclass
class ZooModels:
    root: Path
    moe_dir: Path
    dense_dir: Path
    checkpoints: dict[int, Path]  # step -> MoE checkpoint folder (the last one is moe_dir)
    report: dict = field(default_factory=dict)
    cached: bool = False


def make_windows(tokenizer, docs: list[dict], seq_len: int) -> tuple[np.ndarray, list[str]]:
    """Per domain: BOS + tokens of each document, end to end, cut into windows of seq_len."""
    by_domain: dict[str, list[str]] = {}
    for d in docs:
        by_domain.setdefault(d["domain"], []).append(d["text"])
    windows, domains = [], []
    for domain in sorted(by_domain):
        stream: list[int] = []
        for ids in tokenizer(by_domain[domain], add_special_tokens=False)["input_ids"]:
            stream += [tokenizer.bos_token_id, *ids]
        n = len(stream) // seq_len
        if n:
            windows.append(np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len))
            domains += [domain] * n
    if not windows:
        raise DeepSeeMoEError("the corpus is too small to make a single training window")
    return np.concatenate(windows), domains


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return schedule_lr(step, recipe.lr, recipe.warmup, recipe.steps)


def schedule_lr(step: int, peak: float, warmup: int, steps: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_steps(recipe: Recipe) -> list[int]:
    return sorted({max(1, round(f * recipe.steps)) for f in recipe.checkpoints} - {recipe.steps})


def quiet_transformers(threads: int) -> None:
    """A training process: no Hugging Face chatter, a fixed number of threads."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)


def train_steps(model, windows, *, steps: int, lr: float, warmup: int, batch_size: int, seed: int,
                weight_decay: float, log_path: str, forward_kwargs: dict | None = None,
                after_step=None) -> None:
    """AdamW on the model's trainable parameters (requires_grad) for `steps` batches of `windows`
    [N, S] drawn in a seeded order (a new permutation per pass); clipped at norm 1; one JSON line of
    loss and elapsed seconds per step in `log_path`. `after_step(done)` runs after each update."""
    import torch

    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        perm, cursor = torch.randperm(len(windows), generator=order), 0
        for step in range(steps):
            if cursor + batch_size > len(perm):
                perm, cursor = torch.randperm(len(windows), generator=order), 0
            batch = windows[perm[cursor: cursor + batch_size]]
            cursor += batch_size
            for group in opt.param_groups:
                group["lr"] = schedule_lr(step, lr, warmup, steps)
            loss = model(input_ids=batch, labels=batch, **(forward_kwargs or {})).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            if after_step is not None:
                after_step(step + 1)
            log.write(json.dumps({"step": step + 1, "loss": float(loss.detach()),
                                  "seconds": time.perf_counter() - start}) + "\n")
            log.flush()


def _train_one(kind: str, recipe: Recipe, tokenizer_dir: str, windows_path: str, out_dir: str, log_path: str,
               threads: int) -> None:
    """Entry point of a training process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers(threads)
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = moe_config(recipe, tokenizer) if kind == "moe" else dense_config(recipe, tokenizer)
    kwargs = {"experts_implementation": "eager"} if kind == "moe" else {}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    ckpts = set(checkpoint_steps(recipe))
    out = Path(out_dir)
    parts = ternary_parts(recipe, kind == "moe")
    targets = []
    if parts:  # ternary in every forward pass from the first step, float weights underneath (STE)
        from deepseemoe.models.load import handle_from_model
        from deepseemoe.models.ternary import train_ternary

        targets = train_ternary(handle_from_model(model), parts)

    def save_checkpoint(done: int) -> None:
        if done in ckpts:
            folder = out / "checkpoints" / f"step-{done:06d}"
            if targets:  # what the forward pass uses: the ternary weights
                from deepseemoe.models.ternary import baked_state_dict

                model.save_pretrained(folder, state_dict=baked_state_dict(model, targets))
            else:
                model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    train_steps(model, torch.from_numpy(np.load(windows_path)), steps=recipe.steps, lr=recipe.lr,
                warmup=recipe.warmup, batch_size=recipe.batch_size, seed=recipe.seed,
                weight_decay=recipe.weight_decay, log_path=log_path,
                forward_kwargs={"output_router_logits": True} if kind == "moe" else None,  # + the router aux loss
                after_step=save_checkpoint)
    if targets:
        from deepseemoe.models.ternary import TERNARY_JSON, bake, ternary_record

        atomic_write_json(out / TERNARY_JSON, ternary_record(parts, "tensor", bake(targets)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEEPSEEMOE_CACHE", Path.home() / ".cache" / "deepseemoe"))


@dataclass
class CachedEntry:
    """One entry of the zoo cache: complete when its report.json was written (training finished), and
    the model folders in it (each with a config.json)."""

    path: Path
    complete: bool
    models: list[Path]


def cached_models(cache_dir: str | Path | None = None) -> tuple[Path, list[CachedEntry]]:
    """The zoo folder of the cache and its entries, in name order (none when it does not exist)."""
    root = Path(cache_dir or default_cache_dir()) / "zoo"
    entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return root, [CachedEntry(e, (e / "report.json").exists(),
                              [p for p in sorted(e.iterdir()) if (p / "config.json").exists()]) for e in entries]


def cache_key(recipe: Recipe, corpus_dir: Path) -> str:
    import tokenizers
    import torch
    import transformers

    settings = recipe.to_dict()
    if not settings["ternary"]:  # added later: float recipes keep the keys (and caches) they had
        del settings["ternary"]
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in ("train.jsonl", "val.jsonl"):
        with open(corpus_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return f"{recipe.name}-{h.hexdigest()[:16]}"


def domain_losses(model_dir: Path, windows: np.ndarray, domains: list[str], max_windows: int = 32,
                  threads: int | None = None) -> dict[str, float]:
    """Mean next-token loss (nats/token) per domain on held-out windows."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: dict[str, float] = {}
    domains_arr = np.asarray(domains)
    for domain in sorted(set(domains)):
        sel = torch.from_numpy(windows[domains_arr == domain][:max_windows])
        losses = []
        with torch.no_grad():
            for i in range(0, len(sel), 8):
                losses.append(float(model(input_ids=sel[i:i + 8], labels=sel[i:i + 8]).loss) * len(sel[i:i + 8]))
        out[domain] = sum(losses) / len(sel)
    return out


def unigram_cross_entropy(train: np.ndarray, train_domains: list[str], val: np.ndarray, val_domains: list[str],
                          vocab: int) -> dict[str, float]:
    """Per domain: cross-entropy (nats/token) of the domain's add-½ unigram model (fit on the
    training windows) on the held-out windows' predicted tokens — the trivial baseline."""
    out = {}
    td, vd = np.asarray(train_domains), np.asarray(val_domains)
    for domain in sorted(set(val_domains)):
        counts = np.bincount(train[td == domain].ravel(), minlength=vocab).astype(np.float64) + 0.5
        logp = np.log(counts / counts.sum())
        targets = val[vd == domain][:, 1:].ravel()
        out[domain] = float(-logp[targets].mean())
    return out


def _progress_lines(path: Path) -> dict | None:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def watch_training(runs: dict, tokens_per_step: int, progress: bool = True) -> None:
    """One bar per training process (name → (process, its JSON-lines log, total steps)), read from
    the logs until every process has ended."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.3f} · {task.fields[rate]:,.0f} tok/s"), TimeElapsedColumn(),
                  disable=not progress) as bar:
        tasks = {k: bar.add_task(k, total=total, loss=float("nan"), rate=0.0) for k, (_, _, total) in runs.items()}

        def refresh() -> None:
            for kind, task in tasks.items():
                last = _progress_lines(runs[kind][1])
                if last:
                    bar.update(task, completed=last["step"], loss=last["loss"],
                               rate=last["step"] * tokens_per_step / max(last["seconds"], 1e-9))
        while any(p.is_alive() for p, _, _ in runs.values()):
            refresh()
            time.sleep(0.5)
        refresh()


def train_zoo(corpus_dir: str | Path, *, recipe: str | Recipe = "demo", cache_dir: str | Path | None = None,
              retrain: bool = False, progress: bool = True) -> ZooModels:
    """Tokenizer + MoE + dense twin for `corpus_dir`, trained once and cached by recipe, corpus
    and library versions."""
    import multiprocessing as mp

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / "train.jsonl").exists():
        raise DeepSeeMoEError(f"{corpus_dir} has no train.jsonl; build it with `deepseemoe corpus build`")
    root = Path(cache_dir or default_cache_dir()) / "zoo" / cache_key(recipe, corpus_dir)
    done = root / "report.json"
    if done.exists() and not retrain:
        report = read_json(done, f"delete {root} (or pass --retrain) to train the models again")
        return ZooModels(root, root / "moe", root / "dense",
                         {int(k): Path(v) for k, v in report["checkpoints"].items()}, report, cached=True)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_docs = read_jsonl(corpus_dir / "train.jsonl")
    val_docs = read_jsonl(corpus_dir / "val.jsonl")
    tokenizer = train_tokenizer(train_docs, root / "tokenizer", recipe.vocab_size, recipe.tokenizer_bytes_per_domain)
    train_w, train_dom = make_windows(tokenizer, train_docs, recipe.seq_len)
    val_w, val_dom = make_windows(tokenizer, val_docs, recipe.seq_len)
    np.save(root / "train_windows.npy", train_w)
    prep_seconds = time.perf_counter() - start

    ctx = mp.get_context("spawn")
    threads = 1  # one core per model: two 1-thread runs beat one 2-thread run at this size
    procs = {}
    for kind in ("moe", "dense"):
        procs[kind] = ctx.Process(target=_train_one, args=(kind, recipe, str(root / "tokenizer"),
                                                            str(root / "train_windows.npy"), str(root / kind),
                                                            str(root / f"{kind}.log.jsonl"), threads))
        procs[kind].start()
    watch_training({k: (p, root / f"{k}.log.jsonl", recipe.steps) for k, p in procs.items()},
                   recipe.batch_size * recipe.seq_len, progress)
    failed = [k for k, p in procs.items() if p.exitcode != 0]
    if failed:
        raise DeepSeeMoEError(f"training of the {', '.join(failed)} model failed (see {root}/*.log.jsonl)")
    train_seconds = time.perf_counter() - start - prep_seconds

    checkpoints = {step: root / "moe" / "checkpoints" / f"step-{step:06d}" for step in checkpoint_steps(recipe)}
    checkpoints[recipe.steps] = root / "moe"
    logs = {k: [json.loads(x) for x in (root / f"{k}.log.jsonl").read_text().splitlines()] for k in procs}
    report = {
        "recipe": recipe.to_dict(), "corpus": str(corpus_dir),
        "train_windows": len(train_w), "val_windows": len(val_w),
        "tokens_per_model": recipe.tokens,
        "seconds": {"prepare": round(prep_seconds, 1), "train": round(train_seconds, 1)},
        "train_tokens_per_second": {k: round(recipe.tokens / max(v[-1]["seconds"], 1e-9)) for k, v in logs.items()},
        "final_train_loss": {k: v[-1]["loss"] for k, v in logs.items()},
        "val_loss": {"moe": domain_losses(root / "moe", val_w, val_dom),
                     "dense": domain_losses(root / "dense", val_w, val_dom)},
        "unigram_baseline": unigram_cross_entropy(train_w, train_dom, val_w, val_dom, recipe.vocab_size),
        "checkpoints": {str(k): str(v) for k, v in checkpoints.items()},
    }
    if recipe.ternary:
        from deepseemoe.models.ternary import TERNARY_JSON

        report["ternary"] = {k: read_json(root / k / TERNARY_JSON, "train the models again (--retrain)")
                             for k in procs}
    (root / "train_windows.npy").unlink(missing_ok=True)
    atomic_write_json(done, report)
    return ZooModels(root, root / "moe", root / "dense", checkpoints, report)
