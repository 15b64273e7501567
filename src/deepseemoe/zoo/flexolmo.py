"""Experts trained separately: a FlexOlmo-style model (Shi et al., arXiv 2507.07024) beside the
jointly trained demo MoE and its dense twin, on the same corpus, tokenizer and token budget.

The recipe, scaled to the offline demo:
1. public base: a dense OLMo-2 model (FlexOlmo's architecture: post-norm, QK-norm) whose FFN has
   one expert's width, trained on the public data — a share of every domain's training windows;
2. one expert per domain, trained on that domain's remaining (closed) windows only, as FlexOlmo's
   anchored training does: a two-expert FlexOlmo model [public FFN (frozen), domain FFN
   (initialised from the public FFN)], both always active (top-2 of 2); attention, embeddings,
   norms and the public expert's router row stay frozen; only the domain FFN and its router row
   learn, so every expert learns to cooperate with the same frozen public expert;
   Like FlexOlmo's code, the public halves are held by zeroed gradients with no weight decay, and
   the merge checks that they did not move; no load-balancing loss (both experts are always on);
3. router rows initialised from domain embeddings: the paper averages 1,000 documents' GritLM
   embeddings (about unit norm) per domain and copies the result into every layer; offline there is
   no embedder of the router's width, so we use the variant its Table 3 ablates, the public model's
   own hidden states: per layer, the average of the unit-normalised MoE-block inputs over the
   domain's windows (the public row: the same over the public data);
4. the merge: `transformers`' FlexOlmoForCausalLM with 1 + D experts (expert 0 the public one,
   expert 1 + d the domain d's), the router rows stacked; then a short router-only tuning on a
   mixed sample of the public data (the paper's optional step, with every router row free).
   The paper's negative router bias is left out: HF's FlexOlmo router has none, and FlexOlmo's own
   merge script does not carry it over.

Why top-2 with renormalised weights (HF's FlexOlmo defaults are top-5 of 7, unrenormalised):
top-2 × one expert's width is the joint MoE's active FFN size (top-2 of 16 experts of the same
width) and the dense twin's FFN, so the three compare at equal active FFN size; and with the two
weights renormalised, a token whose top-2 are {public, d} computes what expert d's training pair
computed, the two FFNs weighted by a softmax over their two logits only (the other experts' logits
change nothing; router tuning moves the rows a little).

Matched with the joint pair: tokenizer, context length, batch, total training tokens (base +
experts + router tuning = the joint recipe's steps), active FFN size. Not matched, and cannot be:
the shared parameters see only the base's tokens (about half), the architecture is OLMo-2's
(post-norm), and each expert sees only its domain.

Shapes: windows [N, S] int64, each from one domain (see `zoo.train.make_windows`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import EXPERT_NAMES
from deepseemoe.runs.atomic import atomic_write_json, read_json
from deepseemoe.zoo.recipes import Recipe, get_recipe
from deepseemoe.zoo.train import (
    cache_key,
    default_cache_dir,
    domain_losses,
    make_windows,
    quiet_transformers,
    train_steps,
    train_zoo,
    unigram_cross_entropy,
    watch_training,
)

PUBLIC = "public"
FINISHED = "finished.json"  # written last into a phase's model folder: the phase need not run again


@dataclass(frozen=True)
class SeparateRecipe:
    """How a joint recipe's budget is spent when the experts are trained separately."""

    public_share: float = 0.5  # of each domain's training windows, pooled as the public data
    base_share: float = 0.5  # of the joint recipe's steps, for the public base
    router_share: float = 0.05  # of the steps, for the router-only tuning after the merge
    top_k: int = 2
    norm_topk_prob: bool = True
    expert_lr_scale: float = 1.0  # expert phase peak lr / the joint recipe's lr
    router_lr: float = 2e-3  # FlexOlmo's router tuning lr
    embedding_windows: int = 16  # windows per domain averaged into a domain embedding

    def steps(self, recipe: Recipe, domains: int) -> dict[str, int]:
        base = max(1, round(self.base_share * recipe.steps))
        router = max(1, round(self.router_share * recipe.steps))
        expert = max(1, (recipe.steps - base - router) // domains)
        return {"base": base, "expert": expert, "router": router}


@dataclass
class SeparateModels:
    root: Path
    model_dir: Path  # the merged FlexOlmoForCausalLM
    base_dir: Path  # the public base (dense OLMo-2)
    expert_dirs: dict[str, Path]  # domain -> its two-expert training pair
    report: dict = field(default_factory=dict)
    cached: bool = False


def base_config(recipe: Recipe, tokenizer):
    from transformers import Olmo2Config

    return Olmo2Config(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden, intermediate_size=recipe.expert_hidden,
                       num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                       num_key_value_heads=recipe.heads, max_position_embeddings=recipe.seq_len,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def flex_config(base, experts: list[str], top_k: int, norm_topk_prob: bool):
    """A FlexOlmo config with the base's shape and one expert of the base FFN's width per name."""
    from transformers import FlexOlmoConfig

    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "rope_parameters")
    return FlexOlmoConfig(**{k: getattr(base, k) for k in keep}, num_experts=len(experts),
                          num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, router_aux_loss_coef=0.0,
                          **{EXPERT_NAMES: list(experts)})


def from_base(base_model, experts: list[str], ffns: dict[int, list[tuple]], router: dict[int, np.ndarray], *,
              top_k: int, norm_topk_prob: bool):
    """A FlexOlmoForCausalLM whose shared weights are the base's: per layer, expert e's FFN is
    ffns[layer][e] = (gate [I, D], up [I, D], down [D, I]) and the router rows router[layer] [E, D]."""
    import torch
    from transformers import FlexOlmoForCausalLM

    config = flex_config(base_model.config, experts, top_k, norm_topk_prob)
    model = FlexOlmoForCausalLM(config)
    state = {k: v for k, v in base_model.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
    if stray or unexpected:
        raise DeepSeeMoEError(f"the base does not fit FlexOlmo: missing {stray[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for e, (gate, up, down) in enumerate(ffns[layer]):
                block.mlp.experts.gate_up_proj[e].copy_(torch.cat([gate, up], 0))
                block.mlp.experts.down_proj[e].copy_(down)
            block.mlp.gate.weight.copy_(torch.as_tensor(router[layer]))
    model.tie_weights()
    return model


def base_ffns(base_model) -> dict[int, tuple]:
    return {layer: (b.mlp.gate_proj.weight.detach(), b.mlp.up_proj.weight.detach(), b.mlp.down_proj.weight.detach())
            for layer, b in enumerate(base_model.model.layers)}


def expert_ffn(flex_model, layer: int, e: int) -> tuple:
    """(gate [I, D], up [I, D], down [D, I]) of expert e in a FlexOlmo model's layer."""
    experts = flex_model.model.layers[layer].mlp.experts
    gate, up = experts.gate_up_proj[e].detach().chunk(2, dim=0)
    return gate, up, experts.down_proj[e].detach()


def domain_embeddings(base_model, windows: np.ndarray, batch: int = 8) -> dict[int, np.ndarray]:
    """Per layer: the average over the tokens of `windows` [N, S] of the base's MoE-block input
    (the residual stream entering the FFN), each scaled to unit norm — the router row of data like
    these (a norm below 1, like the paper's averaged unit embeddings)."""
    import torch

    sums: dict[int, torch.Tensor] = {}
    count = 0
    hooks = []
    for layer, block in enumerate(base_model.model.layers):
        def pre(mod, args, layer=layer):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            sums[layer] = sums.get(layer, 0) + x.sum(0)
        hooks.append(block.mlp.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                ids = torch.from_numpy(windows[i:i + batch])
                base_model(input_ids=ids)
                count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {layer: (s / count).float().numpy() for layer, s in sums.items()}


def _split_public(windows: np.ndarray, domains: list[str], share: float, seed: int
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(public windows, closed windows per domain): a seeded `share` of each domain's windows is public."""
    g = np.random.default_rng(seed)
    dom = np.asarray(domains)
    public, closed = [], {}
    for d in sorted(set(domains)):
        rows = np.nonzero(dom == d)[0]
        rows = rows[g.permutation(len(rows))]
        n_pub = round(share * len(rows))
        if n_pub < 1 or len(rows) - n_pub < 1:
            raise DeepSeeMoEError(f"domain {d!r} has {len(rows)} training windows: too few to split into public "
                                  "and closed data; give the corpus more text")
        public.append(windows[rows[:n_pub]])
        closed[d] = windows[rows[n_pub:]]
    return np.concatenate(public), closed


def _train_base(recipe: Recipe, steps: int, tokenizer_dir: str, windows_path: str, out_dir: str, log_path: str,
                threads: int) -> None:
    """Entry point of the base's training process."""
    import torch
    from transformers import AutoTokenizer, Olmo2ForCausalLM

    quiet_transformers(threads)
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = Olmo2ForCausalLM(base_config(recipe, tokenizer))
    train_steps(model, torch.from_numpy(np.load(windows_path)), steps=steps, lr=recipe.lr,
                warmup=min(recipe.warmup, max(1, steps // 10)), batch_size=recipe.batch_size, seed=recipe.seed,
                weight_decay=recipe.weight_decay, log_path=log_path)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    atomic_write_json(Path(out_dir) / FINISHED, {"steps": steps})


def _train_expert(recipe: Recipe, plan: SeparateRecipe, steps: int, domain: str, base_dir: str, windows_path: str,
                  router_path: str, out_dir: str, log_path: str, threads: int) -> None:
    """Entry point of one domain expert's process: FlexOlmo's anchored training of [public, domain]."""
    import torch
    from transformers import AutoTokenizer, Olmo2ForCausalLM

    quiet_transformers(threads)
    torch.manual_seed(recipe.seed)
    base = Olmo2ForCausalLM.from_pretrained(base_dir)
    rows = np.load(router_path)  # [layers, 2, D]: the public row, the domain's row
    ffns = base_ffns(base)
    model = from_base(base, [PUBLIC, domain], {layer: [ffn, ffn] for layer, ffn in ffns.items()},
                      {layer: rows[layer] for layer in range(len(rows))}, top_k=2, norm_topk_prob=plan.norm_topk_prob)
    del base
    for name, p in model.named_parameters():
        if ".mlp.experts." in name or ".mlp.gate." in name:
            p.register_hook(_zero_first)  # slice 0, the public expert and its router row, never moves
        else:
            p.requires_grad_(False)
    # no weight decay: with a zero gradient AdamW leaves the public slice exactly where it was
    train_steps(model, torch.from_numpy(np.load(windows_path)), steps=steps, lr=recipe.lr * plan.expert_lr_scale,
                warmup=max(1, steps // 10), batch_size=recipe.batch_size, seed=recipe.seed, weight_decay=0.0,
                log_path=log_path)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    atomic_write_json(Path(out_dir) / FINISHED, {"steps": steps, "domain": domain})


def _zero_first(grad):
    grad = grad.clone()
    grad[0] = 0
    return grad


def separate_key(recipe: Recipe, plan: SeparateRecipe, corpus_dir: Path) -> str:
    h = hashlib.sha256(json.dumps({"joint": cache_key(recipe, corpus_dir), "plan": asdict(plan)},
                                  sort_keys=True).encode())
    return f"{recipe.name}-separate-{h.hexdigest()[:16]}"


def train_separate(corpus_dir: str | Path, *, recipe: str | Recipe = "demo", plan: SeparateRecipe | None = None,
                   cache_dir: str | Path | None = None, retrain: bool = False, progress: bool = True
                   ) -> SeparateModels:
    """The public base, one expert per domain and their merge, trained once and cached by recipe,
    plan, corpus and library versions. Uses the joint pair's tokenizer (trained if not cached)."""
    import multiprocessing as mp

    from transformers import AutoTokenizer, Olmo2ForCausalLM

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    plan = plan or SeparateRecipe()
    corpus_dir = Path(corpus_dir)
    joint = train_zoo(corpus_dir, recipe=recipe, cache_dir=cache_dir, progress=progress)  # the tokenizer, the pair
    root = Path(cache_dir or default_cache_dir()) / "zoo" / separate_key(recipe, plan, corpus_dir)
    done = root / "report.json"
    if done.exists() and not retrain:
        report = read_json(done, f"delete {root} (or pass --retrain) to train the separate experts again")
        return SeparateModels(root, root / "model", root / "base",
                              {d: root / "experts" / d for d in report["domains"]}, report, cached=True)
    if retrain and root.exists():  # finished phases are kept between runs; a retrain starts from nothing
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from deepseemoe.zoo.tokenizer import read_jsonl

    tokenizer_dir = joint.root / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_w, train_dom = make_windows(tokenizer, read_jsonl(corpus_dir / "train.jsonl"), recipe.seq_len)
    val_w, val_dom = make_windows(tokenizer, read_jsonl(corpus_dir / "val.jsonl"), recipe.seq_len)
    public, closed = _split_public(train_w, train_dom, plan.public_share, recipe.seed)
    domains = sorted(closed)
    steps = plan.steps(recipe, len(domains))
    np.save(root / "public_windows.npy", public)
    for d, w in closed.items():
        np.save(root / f"closed_{d}.npy", w)
    ctx = mp.get_context("spawn")

    # 1. the public base: one process, both cores (a phase that finished before is not run again)
    if not _finished(root / "base"):
        proc = ctx.Process(target=_train_base, args=(recipe, steps["base"], str(tokenizer_dir),
                                                     str(root / "public_windows.npy"), str(root / "base"),
                                                     str(root / "base.log.jsonl"), min(2, os.cpu_count() or 1)))
        proc.start()
        watch_training({"base": (proc, root / "base.log.jsonl", steps["base"])},
                       recipe.batch_size * recipe.seq_len, progress)
        if proc.exitcode != 0:
            raise DeepSeeMoEError(f"training of the public base failed (see {root}/base.log.jsonl)")

    # 2. router rows from domain embeddings, then the experts, two processes of one thread at a time
    base = Olmo2ForCausalLM.from_pretrained(root / "base").eval()
    emb = {PUBLIC: domain_embeddings(base, public[: plan.embedding_windows])}
    for d in domains:
        emb[d] = domain_embeddings(base, closed[d][: plan.embedding_windows])
    for d in domains:
        np.save(root / f"router_{d}.npy", np.stack([np.stack([emb[PUBLIC][la], emb[d][la]])
                                                   for la in range(recipe.layers)]))
    todo = [d for d in domains if not _finished(root / "experts" / d)]
    for i in range(0, len(todo), 2):
        procs = {}
        for d in todo[i:i + 2]:
            procs[d] = ctx.Process(target=_train_expert, args=(
                recipe, plan, steps["expert"], d, str(root / "base"), str(root / f"closed_{d}.npy"),
                str(root / f"router_{d}.npy"), str(root / "experts" / d), str(root / f"expert_{d}.log.jsonl"), 1))
            procs[d].start()
        watch_training({d: (p, root / f"expert_{d}.log.jsonl", steps["expert"]) for d, p in procs.items()},
                       recipe.batch_size * recipe.seq_len, progress)
        failed = [d for d, p in procs.items() if p.exitcode != 0]
        if failed:
            raise DeepSeeMoEError(f"training of the {', '.join(failed)} expert failed (see {root}/expert_*.log.jsonl)")

    # 3. the merge, then router-only tuning on a mixed sample
    model = merge(root / "base", {d: root / "experts" / d for d in domains}, top_k=plan.top_k,
                  norm_topk_prob=plan.norm_topk_prob)
    tune_router(model, public, steps=steps["router"], lr=plan.router_lr, batch_size=recipe.batch_size,
                seed=recipe.seed + 1, log_path=str(root / "router.log.jsonl"))
    model.eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train_seconds = time.perf_counter() - start

    logs = {k: [json.loads(x) for x in (root / f"{k}.log.jsonl").read_text().splitlines()]
            for k in ["base", *(f"expert_{d}" for d in domains), "router"]}
    report = {
        "recipe": recipe.to_dict(), "plan": asdict(plan), "corpus": str(corpus_dir), "domains": domains,
        "experts": [PUBLIC, *domains], "steps": steps,
        "windows": {"public": len(public), **{d: len(w) for d, w in closed.items()}},
        "tokens": {"base": steps["base"] * recipe.batch_size * recipe.seq_len,
                   "per_expert": steps["expert"] * recipe.batch_size * recipe.seq_len,
                   "router": steps["router"] * recipe.batch_size * recipe.seq_len,
                   "total": (steps["base"] + len(domains) * steps["expert"] + steps["router"])
                   * recipe.batch_size * recipe.seq_len,
                   "joint_per_model": recipe.tokens},
        "seconds": {"train": round(train_seconds, 1)},
        "final_train_loss": {k: v[-1]["loss"] for k, v in logs.items()},
        "val_loss": {"separate": domain_losses(root / "model", val_w, val_dom),
                     "public_base": domain_losses(root / "base", val_w, val_dom),
                     "moe": joint.report["val_loss"]["moe"], "dense": joint.report["val_loss"]["dense"]},
        "unigram_baseline": unigram_cross_entropy(train_w, train_dom, val_w, val_dom, recipe.vocab_size),
        "joint": str(joint.root),
    }
    for f in [root / "public_windows.npy", *(root / f"closed_{d}.npy" for d in domains)]:
        f.unlink(missing_ok=True)
    atomic_write_json(done, report)
    return SeparateModels(root, root / "model", root / "base", {d: root / "experts" / d for d in domains}, report)


def tune_router(model, windows: np.ndarray, *, steps: int, lr: float, batch_size: int, seed: int,
                log_path: str) -> None:
    """FlexOlmo's router tuning: every router row learns (the public one too), experts and shared
    weights frozen, with every expert active (as FlexOlmo's tuning config runs top-k = all experts),
    so each row gets a gradient whether or not top-k would pick it."""
    import torch

    routers = [block.mlp.gate for block in model.model.layers]
    top_k = [r.top_k for r in routers]
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp.gate." in name)
    for r in routers:
        r.top_k = r.num_experts
    try:
        train_steps(model, torch.from_numpy(windows), steps=steps, lr=lr, warmup=max(1, steps // 10),
                    batch_size=batch_size, seed=seed, weight_decay=0.0, log_path=log_path)
    finally:
        for r, k in zip(routers, top_k, strict=True):
            r.top_k = k
        for p in model.parameters():
            p.requires_grad_(True)


def _finished(folder: Path) -> bool:
    return (folder / FINISHED).exists()


def merge(base_dir: Path, expert_dirs: dict[str, Path], *, top_k: int, norm_topk_prob: bool):
    """FlexOlmo's merge: the base's shared weights, expert 0 the public FFN, expert 1 + d the
    FFN domain d's pair trained, the router rows stacked (each pair's public row is the same)."""
    from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

    base = Olmo2ForCausalLM.from_pretrained(base_dir)
    ffns = {layer: [ffn] for layer, ffn in base_ffns(base).items()}
    rows: dict[int, list] = {layer: [] for layer in ffns}
    for d, folder in expert_dirs.items():
        pair = FlexOlmoForCausalLM.from_pretrained(folder)
        for layer in ffns:
            public = expert_ffn(pair, layer, 0)
            if any((a != b).any() for a, b in zip(public, ffns[layer][0], strict=True)):
                raise DeepSeeMoEError(f"the public expert moved while training {d}'s expert ({folder}); retrain it")
            router = pair.model.layers[layer].mlp.gate.weight.detach()
            if not rows[layer]:
                rows[layer].append(router[0].numpy())
            elif (router[0].numpy() != rows[layer][0]).any():
                raise DeepSeeMoEError(f"{d}'s pair has another public router row than the others ({folder})")
            ffns[layer].append(expert_ffn(pair, layer, 1))
            rows[layer].append(router[1].numpy())
    return from_base(base, [PUBLIC, *expert_dirs], ffns, {la: np.stack(r) for la, r in rows.items()}, top_k=top_k,
                     norm_topk_prob=norm_topk_prob)
