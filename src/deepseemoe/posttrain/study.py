"""Post-training an MoE with LoRA, strategy by strategy and seed by seed, and what each did.

`post_train(settings)` opens the base model, reads the training and held-out text, picks the hint
(when a strategy needs one), measures the base model once, then for every point (strategy × seed,
and the dense twin's `all` × seed) trains a fresh LoRA, merges it, measures the merged model on the
same held-out tokens and saves the point; finished points of a killed run are reused. It returns
the table: per strategy, the mean and the spread (sample standard deviation) over the seeds.

The training objective is the model's next-token loss on the target text (padding ignored); the
`router-by-hint` strategy adds, at the hint's layer, a routing target on the router's softmax:
−log Σ_{e ∈ hinted} p_e on the tokens where a hint feature fires, and KL(p_before ‖ p) on every other
token (its routing held where it was), weighted by `router_weight` and `hold_weight`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import torch

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.measures import apart, over_seeds, plus_minus
from deepseemoe.models.handle import ModelHandle
from deepseemoe.posttrain import hints as hint_lib
from deepseemoe.posttrain.lora import HINTED, STRATEGIES, apply_lora, merged, require_peft, strategy_targets
from deepseemoe.posttrain.measure import Snapshot, compare, hint_held, snapshot
from deepseemoe.runs.posttrain import PostTrainRun


@dataclass
class PostTrainSettings:
    model: str
    data: str
    eval: str
    out: str
    strategies: list[str] = dc_field(default_factory=lambda: ["all", "frozen-router", "router-only"])
    target_domain: str | None = None
    dense: str | None = None
    hint: str | None = None  # RUN_DIR:DICTIONARY
    seeds: int = 3
    steps: int = 40
    rank: int = 4
    # the dense twin's rank: None matches its trainable parameters to the MoE's `all` at `rank` (the
    # same budget; LoRA's count is linear in the rank)
    dense_rank: int | None = None
    alpha: float = 8.0
    lr: float = 2e-3
    batch_size: int = 8
    ctx_len: int | None = None
    train_tokens: int = 50_000
    eval_tokens: int = 20_000
    hint_features: int = 8
    experts: float = 2.0  # hinted experts: a count ≥ 1 or a share of the layer's experts
    router_weight: float = 1.0
    hold_weight: float = 1.0
    field: str = "text"
    domain_field: str | None = "domain"
    keep_adapters: bool = False
    dtype: str | None = "float32"
    device: str | None = None
    device_map: str | None = None
    log: list[str] = dc_field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self, model_id: str, dense_id: str | None) -> str:
        from deepseemoe.runs.stamp import digest

        s = {k: v for k, v in self.to_dict().items() if k not in ("out", "device", "device_map", "log")}
        return digest(settings=s, model=model_id, dense=dense_id)


@dataclass
class PostTrainResult:
    run: PostTrainRun
    rows: list[dict]
    hint: dict | None
    base: dict
    reused: list[str]


def point_names(settings: PostTrainSettings) -> list[tuple[str, str, int, bool]]:
    """(name, strategy, seed, dense) of every point, in the order they run."""
    out = [(f"{s}-seed{i}", s, i, False) for s in settings.strategies for i in range(settings.seeds)]
    if settings.dense:
        out += [(f"dense-all-seed{i}", "all", i, True) for i in range(settings.seeds)]
    return out


# ---- text ------------------------------------------------------------------------------------------

def _batches(handle: ModelHandle, spec: str, settings: PostTrainSettings, *, tokens: int, domain: str | None,
             what: str, balanced: bool = False) -> list:
    """Packed batches of SPEC: `domain`'s documents (and unlabelled ones) when given; with `balanced`,
    an equal share of `tokens` from every domain (held-out text: the target's gain and every other
    domain's forgetting are measured however long the first documents are)."""
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents

    source = TextSource(spec, field=settings.field, domain_field=settings.domain_field,
                        interleave_domains=settings.domain_field is not None)
    ctx = handle.check_ctx_len(settings.ctx_len)

    def pack(docs, budget: int) -> list:
        return list(pack_documents(handle.require_tokenizer(), docs, ctx_len=ctx, batch_size=settings.batch_size,
                                   max_tokens=budget))

    if domain is not None:  # the target's documents; unlabelled ones are taken as target text
        batches = pack((d for d in iter_documents(source) if d.domain in (domain, None)), tokens)
    elif balanced and settings.domain_field is not None:
        import itertools

        # the domains: interleaved documents bring every domain into the first window
        from deepseemoe.data.sources import INTERLEAVE_WINDOW

        domains = sorted({d.domain for d in itertools.islice(iter_documents(source), INTERLEAVE_WINDOW)},
                         key=lambda d: (d is None, str(d)))
        share = max(1, tokens // max(1, len(domains)))
        batches = [b for name in domains for b in pack((d for d in iter_documents(source) if d.domain == name), share)]
    else:
        batches = pack(iter_documents(source), tokens)
    if not batches or sum(b.num_tokens for b in batches) == 0:
        where = f" of domain {domain!r}" if domain else ""
        raise DeepSeeMoEError(f"{what} {spec} holds no text{where}; give text to post-train on")
    return batches


def _target_domain(settings: PostTrainSettings, eval_domains: set[str]) -> str:
    from deepseemoe.data.sources import TextSource, iter_documents

    if settings.target_domain:
        if settings.target_domain not in eval_domains:
            raise DeepSeeMoEError(f"--target-domain {settings.target_domain!r} is not a domain of --eval "
                                  f"({', '.join(sorted(eval_domains)) or 'no domain labels'}); choose one of them")
        return settings.target_domain
    seen = {d.domain for d in iter_documents(TextSource(settings.data, field=settings.field,
                                                        domain_field=settings.domain_field, max_docs=1000))}
    if len(seen) == 1 and next(iter(seen)) in eval_domains:
        return next(iter(seen))
    raise DeepSeeMoEError("say which domain of --eval is the target text: --target-domain NAME (one of "
                          f"{', '.join(sorted(eval_domains)) or 'none: --eval has no domain labels'})")


# ---- training ------------------------------------------------------------------------------------

class RoutingTarget:
    """The router-by-hint loss at one layer (module docstring): hooks the router, keeps its input."""

    def __init__(self, handle: ModelHandle, layer: int, experts: list[int]):
        moe = handle.moe_layers[layer]
        self.router, self.E, self.experts = moe.router, moe.num_experts, experts
        self.adapter = moe.adapter
        self.w0 = self.router.weight.detach().clone()  # the base router, before any LoRA
        self.b0 = None if getattr(self.router, "bias", None) is None else self.router.bias.detach().clone()
        self.got: dict[str, torch.Tensor] = {}
        self.path, self.hook = moe.router_path, None

    def attach(self, peft_model) -> None:
        """Hook the module now at the router's path: PEFT's wrapper, whose output includes the LoRA
        update (a LoRA'd nn.Linear adds it outside the base router, which a hook there would miss)."""
        self.hook = peft_model.base_model.model.get_submodule(self.path).register_forward_hook(self._store)

    def _store(self, module, args, out):
        x = args[0].reshape(-1, self.w0.shape[1])
        self.got["logits"] = self.adapter.router_logits(out, self.E).reshape(-1, self.E).float()
        base = x.detach().float() @ self.w0.float().T
        self.got["base"] = base if self.b0 is None else base + self.b0.float()

    def loss(self, hint: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(self.got["logits"], -1)
        p0 = torch.softmax(self.got["base"], -1)
        hint, keep = hint.to(logp.device), keep.to(logp.device)
        zero = logp.sum() * 0
        pull = -torch.logsumexp(logp[hint][:, self.experts], -1).mean() if hint.any() else zero
        rest = keep & ~hint
        kl = (p0 * (torch.log(p0.clamp_min(1e-30)) - logp)).sum(-1)
        hold = kl[rest].mean() if rest.any() else zero
        return pull, hold

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()


def train_lora(model, batches: list, *, steps: int, lr: float, seed: int, routing: RoutingTarget | None = None,
               hint_masks: list[torch.Tensor] | None = None, router_weight: float = 1.0, hold_weight: float = 1.0,
               on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """AdamW (no weight decay: masked LoRA slices must stay at zero) on the trainable parameters for
    `steps` batches drawn in a seeded order, warm-up then cosine decay, clipped at norm 1."""
    from deepseemoe.zoo.train import schedule_lr

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    order = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    perm, cursor, log = torch.randperm(len(batches), generator=order), 0, []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if cursor >= len(perm):
            perm, cursor = torch.randperm(len(batches), generator=order), 0
        i = int(perm[cursor])
        cursor += 1
        b = batches[i]
        for g in opt.param_groups:
            g["lr"] = schedule_lr(step, lr, max(1, steps // 10), steps)
        ids, am = b.input_ids.to(device), b.attention_mask.to(device)
        labels = ids.masked_fill(am == 0, -100)
        lm = model(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
        total, line = lm, {"step": step + 1, "loss": float(lm.detach())}
        if routing is not None:
            pull, hold = routing.loss(hint_masks[i], b.keep)
            total = lm + router_weight * pull + hold_weight * hold
            line.update(pull=float(pull.detach()), hold=float(hold.detach()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        line["seconds"] = time.perf_counter() - start
        log.append(line)
        if on_step is not None:
            on_step(line)
    model.eval()
    return log


# ---- the study -----------------------------------------------------------------------------------

def _load(model: str, settings: PostTrainSettings, trust_remote_code: bool) -> ModelHandle:
    from deepseemoe.models.load import load_model

    return load_model(model, dtype=settings.dtype, device=settings.device, device_map=settings.device_map,
                      trust_remote_code=trust_remote_code, experts_implementation="eager")


def _check(settings: PostTrainSettings) -> None:
    unknown = [s for s in settings.strategies if s not in STRATEGIES]
    if unknown:
        raise DeepSeeMoEError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if not settings.strategies:
        raise DeepSeeMoEError("no strategy to run; give --strategy")
    if any(s in HINTED for s in settings.strategies) and not settings.hint:
        raise DeepSeeMoEError(f"strategies {', '.join(s for s in settings.strategies if s in HINTED)} need a hint: "
                              "--hint RUN_DIR:DICTIONARY (a dictionary on the base model, with its `map`)")
    if settings.experts <= 0:
        raise DeepSeeMoEError(f"--experts must be positive (a count or a share of the layer's experts), not "
                              f"{settings.experts}")


def post_train(settings: PostTrainSettings, *, trust_remote_code: bool = False, progress: bool = False,
               echo: Callable[[str], None] | None = None) -> PostTrainResult:
    from deepseemoe.posttrain.hints import model_identity

    _check(settings)
    require_peft()
    handle = _load(settings.model, settings, trust_remote_code)
    if not handle.is_moe:
        raise DeepSeeMoEError(f"{settings.model} has no MoE layer with a router the toolkit recognises; post-train a "
                              "dense model as the --dense twin of an MoE")
    model_id = model_identity(settings.model)
    dense_id = model_identity(settings.dense) if settings.dense else None
    run = PostTrainRun.create(settings.out, {"key": settings.key(model_id, dense_id)})

    eval_batches = _batches(handle, settings.eval, settings, tokens=settings.eval_tokens, domain=None, what="--eval",
                            balanced=True)
    eval_domains = {d for b in eval_batches for d in b.domains.values() if d}
    target = _target_domain(settings, eval_domains)
    train_batches = _batches(handle, settings.data, settings, tokens=settings.train_tokens,
                             domain=target if settings.target_domain else None, what="--data")
    full = settings.batch_size * handle.check_ctx_len(settings.ctx_len)
    if len(train_batches) == 1 and train_batches[0].num_tokens < full:
        raise DeepSeeMoEError(f"the target text holds {train_batches[0].num_tokens} tokens, fewer than one batch "
                              f"({settings.batch_size} × {full // settings.batch_size}); give more text or lower "
                              "--batch-size / --ctx-len")

    hint = hint_train = hint_eval = None
    if any(s in HINTED for s in settings.strategies):
        source = hint_lib.open_hint(settings.hint, handle, model_id)
        train_lat = hint_lib.latents_by_batch(handle, source, train_batches)
        hint = hint_lib.choose_hint(source, train_lat, n_features=settings.hint_features, experts=settings.experts,
                                    num_experts=handle.moe_layers[source.layer].num_experts)
        hint_train = hint_lib.token_mask(train_lat, train_batches, hint.features)
        eval_lat = hint_lib.latents_by_batch(handle, source, eval_batches)
        hint_eval = torch.cat([m[b.keep] for m, b in zip(hint_lib.token_mask(eval_lat, eval_batches, hint.features),
                                                         eval_batches, strict=True)]).numpy()

    before = snapshot(handle, eval_batches)
    base = {"target_domain": target, "ce": before.loss["by_domain"], "train_tokens": sum(b.num_tokens for b in train_batches),
            "eval_tokens": sum(b.num_tokens for b in eval_batches)}
    if hint is not None:  # where the hint tokens went before any training (the table's column is after)
        la = hint.layer
        base["hint_routed"] = hint_held(before.routing[la], before.routing[la], hint_eval, hint.experts,
                                        handle.moe_layers[la].num_experts)["hint_routed_before"]
    dense_before = dense_handle = None
    if settings.dense:
        dense_handle = _load(settings.dense, settings, trust_remote_code)
        if dense_handle.require_tokenizer().get_vocab() != handle.require_tokenizer().get_vocab():
            raise DeepSeeMoEError(f"the dense twin {settings.dense} has another tokenizer than {settings.model}; the "
                                  "twin must read the same tokens")
        dense_before = snapshot(dense_handle, eval_batches)
        base["dense_ce"] = dense_before.loss["by_domain"]
        base["dense_rank"] = settings.dense_rank or matched_rank(handle, dense_handle, settings.rank)
    run.save_settings({"key": settings.key(model_id, dense_id), "settings": settings.to_dict(), "model_id": model_id,
                       "dense_id": dense_id, "hint": hint.to_dict() if hint else None, "base": base})

    points = point_names(settings)
    todo = [p for p in points if not run.finished(p[0])]
    reused = [p[0] for p in points if run.finished(p[0])]
    for name in reused:  # a finished point of a killed run is read back only if its files are intact
        run.point(name)
    # the loaded base models serve their first point (a fresh copy is loaded for every later one)
    spare = {False: handle, True: dense_handle}
    from deepseemoe.dictionaries.training import MetricSinks
    from deepseemoe.progress import progress_bar

    # metrics.jsonl of every step, and wandb / tensorboard / trackio when asked for
    sinks = MetricSinks(settings, run.path, enabled=bool(settings.log), path=run.metrics)
    with progress_bar(disable=not progress, unit="steps") as bar:
        task = bar.add_task("post-train", total=len(todo) * settings.steps)
        for name, strategy, seed, dense in todo:
            def on_step(line, name=name):
                sinks([{"coder": name, **line}])
                bar.update(task, advance=1, description=f"post-train {name} · loss {line['loss']:.3f}")

            fresh = spare.pop(dense, None) or _load(settings.dense if dense else settings.model, settings,
                                                     trust_remote_code)
            rank = base["dense_rank"] if dense else settings.rank
            result = _run_point(settings, name, strategy, seed, dense, rank, fresh, train_batches,
                                eval_batches, target, hint, hint_train, hint_eval,
                                dense_before if dense else before, run, on_step)
            if echo:
                echo(f"{name}: target ΔCE {result['target_delta_ce']:+.3f} · forgetting {result['forgetting']:+.3f}"
                     + (f" · drift {result['drift']:.3f}" if "drift" in result else "") + f" · {result['seconds']:.0f} s")
    sinks.close()
    from deepseemoe.posttrain.figures import posttrain_figures

    docs = [run.point(name, verify=False) for name, *_ in points]  # verified when written or reused above
    rows = table_rows(docs)
    run.save_table(rows, table_markdown(rows), findings(rows, base), draw=lambda folder: posttrain_figures(docs, folder))
    return PostTrainResult(run, rows, {**hint.to_dict(), "routed_before": base["hint_routed"]} if hint else None, base,
                           reused)


def matched_rank(moe: ModelHandle, dense: ModelHandle, rank: int) -> int:
    """The dense twin's LoRA rank whose trainable-parameter count is nearest the MoE's `all` at `rank`."""
    from deepseemoe.posttrain.lora import lora_size

    moe_size = lora_size(moe.model, strategy_targets(moe, "all"))
    dense_size = lora_size(dense.model, strategy_targets(dense, "all"))
    return max(1, round(rank * moe_size / dense_size))


def _run_point(settings, name, strategy, seed, dense, rank: int, handle: ModelHandle, train_batches, eval_batches, target, hint,
               hint_train, hint_eval, before: Snapshot, run: PostTrainRun, on_step) -> dict:
    """One point on `handle`, a fresh copy of the base weights (LoRA is merged into it)."""
    experts = None
    if strategy == "experts-by-hint":
        experts = hint.experts
    elif strategy == "random-experts":
        rng = np.random.default_rng(1000 + seed)
        experts = sorted(int(e) for e in rng.choice(handle.moe_layers[hint.layer].num_experts, len(hint.experts),
                                                     replace=False))
    targets = strategy_targets(handle, strategy, hint.layer if hint else None, experts)
    routing = RoutingTarget(handle, hint.layer, hint.experts) if strategy == "router-by-hint" else None
    torch.manual_seed(seed)
    # alpha scales with the rank (alpha / rank stays the MoE's) so a matched dense rank is not a larger step
    pm, trainable = apply_lora(handle.model, targets, rank, settings.alpha * rank / settings.rank)
    if routing is not None:
        routing.attach(pm)
    start = time.perf_counter()
    try:
        log = train_lora(pm, train_batches, steps=settings.steps, lr=settings.lr, seed=seed, routing=routing,
                         hint_masks=hint_train, router_weight=settings.router_weight,
                         hold_weight=settings.hold_weight, on_step=on_step)
    finally:
        if routing is not None:
            routing.close()
    seconds = time.perf_counter() - start
    adapter: dict[str, bytes] = {}
    if settings.keep_adapters:  # PEFT's adapter folder, saved before the merge folds it away
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            pm.save_pretrained(tmp)
            adapter = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    model = merged(pm)

    def write_model(tmp: Path) -> None:
        if adapter:
            (tmp / "adapter").mkdir()
            for fname, data in adapter.items():
                (tmp / "adapter" / fname).write_bytes(data)
            return
        model.save_pretrained(tmp / "model")
        handle.require_tokenizer().save_pretrained(tmp / "model")
    from deepseemoe.models.load import handle_from_model

    after_handle = handle_from_model(model, handle.tokenizer, name=handle.name)
    after = snapshot(after_handle, eval_batches)
    result = {"name": name, "strategy": "dense-all" if dense else strategy, "seed": seed, "rank": rank,
              "trainable": int(trainable),
              "steps": settings.steps, "seconds": seconds, "experts": experts,
              "final_loss": float(np.mean([m["loss"] for m in log[-max(1, len(log) // 10):]])),
              **compare(before, after, target)}
    if hint is not None and not dense:
        la = hint.layer
        result["hint_held"] = hint_held(before.routing[la], after.routing[la], hint_eval, hint.experts,
                                        handle.moe_layers[la].num_experts)
    run.save_point(name, result, write_model, log)
    return result


# ---- the table -----------------------------------------------------------------------------------

COLUMNS = (("target_delta_ce", "target ΔCE"), ("forgetting", "forgetting"), ("drift", "routing drift"),
           ("changed", "tokens rerouted"), ("hint_routed_after", "hint tokens → hinted experts"),
           ("other_drift", "drift where no hint fires"), ("nmi_after", "domain NMI after"),
           ("trainable", "trainable"), ("seconds", "seconds"))


def _value(doc: dict, key: str) -> float:
    if key in doc:
        return float(doc[key])
    if key in ("hint_routed_after", "other_drift"):
        return float(doc.get("hint_held", {}).get(key, float("nan")))
    if key == "nmi_after" and doc.get("layers"):
        return float(np.nanmean([v["nmi_after"] for v in doc["layers"].values()]))
    return float("nan")


def table_rows(docs: list[dict]) -> list[dict]:
    """One row per strategy (points in run order): mean and sample sd over its seeds of every column."""
    by: dict[str, list[dict]] = {}
    for doc in docs:
        by.setdefault(doc["strategy"], []).append(doc)
    rows = []
    for strategy, mine in by.items():
        row = {"strategy": strategy, "seeds": len(mine), "rank": mine[0].get("rank")}
        for key, _ in COLUMNS:
            row[key], row[f"{key}_sd"] = over_seeds(_value(d, key) for d in mine)
        rows.append(row)
    return rows


SIGNED = ("target_delta_ce", "forgetting")  # differences are signed, shares (drift) are not


def _pm(row: dict, key: str, digits: int = 3) -> str:
    return plus_minus(row[key], row.get(f"{key}_sd"), digits, signed=key in SIGNED)


def _apart(a: dict, b: dict, key: str) -> bool:
    return apart(a[key], a.get(f"{key}_sd", 0.0), b[key], b.get(f"{key}_sd", 0.0))


def findings(rows: list[dict], base: dict) -> list[str]:
    """Sentences written from the table's numbers, each claim one comparison the numbers make (a
    difference is called a difference only when it exceeds the seeds' spread)."""
    r = {row["strategy"]: row for row in rows}
    target, out = base.get("target_domain", "the target"), []
    if "all" in r and "dense-all" in r:
        m, d = r["all"], r["dense-all"]
        s = (f"Every weight adapted (`all`, {m['trainable']:,.0f} trainable), the MoE's ΔCE on {target} is "
             f"{_pm(m, 'target_delta_ce')} and it forgets {_pm(m, 'forgetting')} on the other domains; its dense twin "
             f"at the same budget (rank {d.get('rank')}, {d['trainable']:,.0f} trainable) has ΔCE "
             f"{_pm(d, 'target_delta_ce')} and forgets {_pm(d, 'forgetting')}.")
        if not _apart(m, d, "forgetting"):
            s += " Their forgetting differs by less than the seeds' spread."
        elif m["forgetting"] > d["forgetting"]:
            s += " The MoE forgets more than its dense twin, beyond the seeds' spread."
        else:
            s += " The MoE forgets less than its dense twin, beyond the seeds' spread."
        out.append(s)
    if "all" in r and "frozen-router" in r:
        a, f = r["all"], r["frozen-router"]
        if f["drift"] > 0.5 * a["drift"]:
            out.append(f"Freezing the router does not keep routing still: drift {_pm(f, 'drift')} against "
                       f"{_pm(a, 'drift')} with the router adapted (the experts' inputs change upstream).")
        else:
            out.append(f"Freezing the router cuts routing drift from {_pm(a, 'drift')} to {_pm(f, 'drift')}.")
    if "router-only" in r:
        ro = r["router-only"]
        out.append(f"The router alone (`router-only`, {ro['trainable']:,.0f} trainable) moves routing (drift "
                   f"{_pm(ro, 'drift')}) for a target ΔCE of {_pm(ro, 'target_delta_ce')}.")
    if "router-by-hint" in r and "hint_routed" in base:
        rb = r["router-by-hint"]
        out.append(f"`router-by-hint` puts {rb['hint_routed_after']:.0%} of the hint tokens on the hinted experts "
                   f"(before: {base['hint_routed']:.0%}); where no hint fires, routing at that layer drifts "
                   f"{_pm(rb, 'other_drift')} (the hold term aims at 0).")
    if "experts-by-hint" in r and "random-experts" in r:
        h, rnd = r["experts-by-hint"], r["random-experts"]
        s = (f"LoRA on the hinted experts gives a target ΔCE of {_pm(h, 'target_delta_ce', 4)}, on as many random "
             f"experts {_pm(rnd, 'target_delta_ce', 4)}: ")
        if not _apart(h, rnd, "target_delta_ce"):
            s += "a difference within the seeds' spread, so the hint does not beat random experts here."
        elif h["target_delta_ce"] < rnd["target_delta_ce"]:
            s += "the hint beats random experts by more than the seeds' spread."
        else:
            s += "random experts do better than the hinted ones, by more than the seeds' spread."
        out.append(s)
    return out


def table_markdown(rows: list[dict]) -> str:
    head = "| strategy | seeds | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            if key == "trainable" and not np.isnan(v):
                cells.append(f"{v:,.0f}")
            elif key == "seconds" and not np.isnan(v):
                cells.append(f"{v:.1f}")
            else:
                cells.append(plus_minus(v, r[f"{key}_sd"], 4, signed=key in SIGNED))
        lines.append(f"| {r['strategy']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
