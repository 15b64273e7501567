"""`deepseemoe demo`: the whole pipeline on the offline default, from nothing to a report.

Stages: corpus (text on this machine) → tokenizer + MoE + dense twin (trained once, cached) →
load the MoE from its folder exactly like a hub model → route the held-out split → route the
same text through the intermediate checkpoints → routing statistics → SmolLM2 carved into an MoE
(co-activation clusters, and a random split as the null), each routed, its experts measured as
specialists, and a block-input SAE of the clustered carve mapped to its experts → dictionaries,
feature maps, causal checks and the MoE-vs-dense table of the trained pair → descriptions of one
layer's carved experts and of features of both SAEs by the offline explainer (SmolLM2), scored →
attribution graphs of one held-out prompt per domain through the router → the MoE and its dense
twin post-trained with LoRA on the domain the MoE knows least, every strategy, 3 seeds → the reach
sweep → report/index.html.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from deepseemoe.data.demo_corpus import build_corpus
from deepseemoe.data.sources import TextSource
from deepseemoe.models.load import load_model
from deepseemoe.progress import out_console
from deepseemoe.report.html import build_report
from deepseemoe.routing.route import route_corpus
from deepseemoe.routing.stats import compute_routing_stats, save_routing_stats
from deepseemoe.runs import stamp
from deepseemoe.runs.atomic import atomic_write_json, read_json
from deepseemoe.runs.dictionary import EVALUATION, DictionaryRun
from deepseemoe.runs.routing import RoutingRun
from deepseemoe.zoo.recipes import get_recipe
from deepseemoe.zoo.train import train_zoo


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def run_demo(out_dir: str | Path = "runs/demo", *, recipe: str = "demo", retrain: bool = False,
             cache_dir: str | Path | None = None, max_tokens: int = 60_000, seed: int = 0,
             console: Console | None = None, explainer=None, separate: bool = False) -> DemoResult:
    """`explainer`: the chat backend of the descriptions stage (default: the offline SmolLM2);
    `separate`: also the FlexOlmo-style model (experts trained separately), in the comparison."""
    console = console or out_console()
    spec = get_recipe(recipe)  # a bad recipe name fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    corpus_dir = out_dir / "corpus"
    built = {"seed": seed, "max_bytes_per_domain": spec.max_bytes_per_domain}
    built_path = corpus_dir / "build.json"
    fix = f"delete {corpus_dir} to build the corpus again"
    if built_path.exists() and read_json(built_path, fix) == built and (corpus_dir / "val.jsonl").exists():
        corpus = read_json(corpus_dir / "report.json", fix)
        console.print(f"[bold]1/11 corpus[/] reused {corpus_dir}")
    else:
        with console.status("[bold]1/11 corpus[/] collecting text found on this machine"):
            corpus = build_corpus(corpus_dir, seed=seed, max_bytes_per_domain=spec.max_bytes_per_domain).to_json()
        atomic_write_json(built_path, built)
        console.print(f"[bold]1/11 corpus[/] {len(corpus['domains'])} domains: "
                      + ", ".join(f"{d} {v['bytes'] / 1e6:.1f} MB" for d, v in corpus["domains"].items()))
    for note in corpus.get("notes", []):
        console.print(f"[yellow]{note}[/]")
    seconds["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    console.print(f"[bold]2/11 models[/] recipe '{recipe}': OLMoE {spec.experts} experts top-{spec.top_k} and its "
                  f"dense twin, {spec.steps} steps each")
    zoo = train_zoo(corpus_dir, recipe=spec, cache_dir=cache_dir, retrain=retrain)
    console.print(f"           {'reused' if zoo.cached else 'trained'}: MoE {zoo.moe_dir}", soft_wrap=True)
    console.print(f"           dense twin {zoo.dense_dir}", soft_wrap=True)
    third = None
    if separate:
        from deepseemoe.zoo.flexolmo import train_separate

        console.print("[bold]2/11 models[/] and experts trained separately: a public base, one expert per domain, "
                      "merged FlexOlmo-style")
        third = train_separate(corpus_dir, recipe=spec, cache_dir=cache_dir, retrain=retrain)
        if third.cached:
            console.print(f"           reused trained models from {third.root}")
    seconds["models"] = time.perf_counter() - t

    t = time.perf_counter()
    source = TextSource(str(corpus_dir / "val.jsonl"), domain_field="domain")
    route_kw = dict(ctx_len=spec.seq_len, batch_size=16, max_tokens=max_tokens)
    run_dir = out_dir / "run"
    final_step = max(zoo.checkpoints)
    earlier = {out_dir / "checkpoints" / f"step-{step:06d}": path for step, path in sorted(zoo.checkpoints.items())
               if step != final_step}
    # warm means nothing recomputed whose inputs did not change: each stage below is stamped with the
    # digest of its inputs (model weights, text, settings, the code, the stage before) and reused when equal
    key = stamp.digest(stage="routing", moe=stamp.model_digest(zoo.moe_dir), val=stamp.file_digest(corpus_dir / "val.jsonl"),
                       checkpoints={str(p): stamp.model_digest(m) for p, m in earlier.items()}, recipe=recipe, **route_kw)
    if stamp.fresh(out_dir, "routing", key, ["run/manifest.json", *(str(p.relative_to(out_dir) / "manifest.json")
                                                                  for p in earlier)]):
        console.print(f"[bold]3/11 routing[/] reused {run_dir}")
    else:
        console.print("[bold]3/11 routing[/] held-out text through the MoE (loaded from its folder like a hub model)")
        handle = load_model(str(zoo.moe_dir))
        route_corpus(handle, source, run_dir, extra={"recipe": recipe, "zoo": str(zoo.root)}, overwrite=True,
                     **route_kw)
        for stale in (out_dir / "checkpoints").glob("step-*") if (out_dir / "checkpoints").is_dir() else []:
            if stale not in earlier and (stale / "manifest.json").exists():  # another recipe's checkpoints
                import shutil

                shutil.rmtree(stale)
        for ck_dir, path in earlier.items():
            # saturation is an average agreement: a third of the tokens pins it down well enough
            route_corpus(load_model(str(path)), source, ck_dir, progress=False, overwrite=True,
                         **{**route_kw, "max_tokens": max(max_tokens // 3, 1000)})
        stamp.write(out_dir, "routing", key)
    seconds["routing"] = time.perf_counter() - t

    t = time.perf_counter()
    key = stamp.digest(stage="stats", routing=key)
    if stamp.fresh(out_dir, "stats", key, ["run/analyses/manifest.json"]):
        routed = RoutingRun.open(run_dir)
        summary = routed.analyses().summary
        console.print(f"[bold]4/11 statistics[/] reused {routed.analyses_dir}")
    else:
        with console.status("[bold]4/11 statistics[/]"):
            save_routing_stats(compute_routing_stats(run_dir))
        routed = RoutingRun.open(run_dir)
        summary = routed.analyses().summary  # as saved (with its inputs): what a warm run reads
        stamp.write(out_dir, "stats", key)
        console.print(f"[bold]4/11 statistics[/] {summary['tokens']:,} tokens → {routed.analyses_dir}")
    seconds["stats"] = time.perf_counter() - t

    t = time.perf_counter()
    carved = _carved(corpus_dir, out_dir, run_dir, key, recipe, zoo.dense_dir, cache_dir, console)
    seconds["carved"] = time.perf_counter() - t

    t = time.perf_counter()
    from deepseemoe.demo.analyses import demo_analyses_outputs, read_demo_analyses, run_demo_analyses

    key = stamp.digest(stage="analyses", stats=key, dense=stamp.model_digest(zoo.dense_dir),
                       train=stamp.file_digest(corpus_dir / "train.jsonl"),
                       separate=stamp.model_digest(third.model_dir) if third is not None else None)
    if stamp.fresh(out_dir, "analyses", key, demo_analyses_outputs(spec.layers // 2)):
        analyses = read_demo_analyses(out_dir)
        console.print("[bold]6/11 dictionaries and causal checks[/] reused")
    else:
        with console.status("[bold]6/11 dictionaries and causal checks[/]"):
            analyses = run_demo_analyses(zoo.moe_dir, zoo.dense_dir, corpus_dir, out_dir, ctx_len=spec.seq_len,
                                         train_tokens=max(10_000, min(60_000, max_tokens)),
                                         eval_tokens=max(1_000, min(4_000, max_tokens // 4)), layer=spec.layers // 2,
                                         separate=third)
        stamp.write(out_dir, "analyses", key)
    ev = analyses["evaluation"]["coders"]
    console.print("[bold]6/11 dictionaries and causal checks[/] " + ", ".join(
        f"{n}: FVU {r['fvu']:.3f}, ΔCE {r.get('delta_ce', float('nan')):.3f}" for n, r in ev.items()))
    if analyses["removal"] is not None:
        from deepseemoe.report.tables import removal_table

        rm = removal_table(analyses["removal"])  # the rows (and kind names) the report and `ablate` show
        console.print(f"  removing {rm.target}: ΔCE on it / elsewhere — " + "; ".join(
            f"{r.model} {r.kind}s {r.selected['target']:.3f} / {r.selected['off_target']:.3f}"
            for r in rm.rows if r.kind != "attention head"))
    seconds["analyses"] = time.perf_counter() - t

    t = time.perf_counter()
    # the experts described: the carved MoE's (a model that knows language), else the trained MoE's
    features = {"trained features": (out_dir / "dictionaries", f"sae_block_in_{spec.layers // 2}")}
    if carved.features is not None:
        features["carved features"] = carved.features
    key = _describe(run_dir, out_dir, spec.layers // 2, carved.experts or (run_dir, spec.layers // 2), features,
                    cache_dir, explainer, _inference_dtype(recipe), console, stamp.digest(analyses=key, carved=carved.key),
                    separate=(third, source, route_kw) if third is not None else None)
    seconds["descriptions"] = time.perf_counter() - t

    t = time.perf_counter()
    key = _attribution(out_dir, corpus_dir, zoo.moe_dir, spec.layers // 2, key, console)
    seconds["attribution"] = time.perf_counter() - t

    t = time.perf_counter()
    key = stamp.digest(attribution=key, posttrain=_post_train(out_dir, corpus_dir, zoo, spec.layers // 2, recipe, console))
    seconds["post-train"] = time.perf_counter() - t

    t = time.perf_counter()
    key = stamp.digest(posttrain=key, sweep=_sweep(out_dir, corpus_dir, zoo, recipe, console))
    seconds["sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    key = stamp.digest(stage="report", sweep=key)
    report = out_dir / "report" / "index.html"
    if stamp.fresh(out_dir, "report", key, ["report/index.html"]):
        console.print(f"[bold]11/11 report[/] reused {report}")
    else:
        report = build_report(run_dir)  # what `deepseemoe report runs/demo/run` writes, from the files alone
        stamp.write(out_dir, "report", key)
        console.print(f"[bold]11/11 report[/] {report}")
    seconds["report"] = time.perf_counter() - t
    return DemoResult(out_dir, report, seconds, summary)


@dataclass(frozen=True)
class DemoCarve:
    """What the demo carves (`zoo carve`), both with co-activation clusters and, as the null, with a
    random split of the same neurons; how much held-out text it routes through each; and the
    block-input SAE it trains on the clustered carve's middle carved layer."""

    model: str  # "smollm2" (the default dense model) or "dense-twin" (the recipe's own dense model: tests)
    layers: tuple[int, ...]
    experts: int = 16
    shared: int = 1
    top_k: int = 8
    calibration_tokens: int = 2048
    eval_tokens: int = 2048
    eval_ks: tuple[int, ...] = (4, 8, 15)
    ctx_len: int = 256
    route_tokens: int = 6_000
    # the carved MoE run after carving (routing, its SAE, descriptions): "auto" is bf16 where this CPU
    # computes it faster (models.load.faster_cpu_dtype); the carve itself and its CE table stay float32
    dtype: str = "auto"
    sae_tokens: int = 48_000
    sae_k: int = 32
    sae_expansion: int = 2
    sae_eval_tokens: int = 1_024
    map_tokens: int = 4_000


# SmolLM2-135M: 30 layers, 1,536 SiLU neurons each. A band of 4 middle layers at 8 of 15 routed experts
# (+1 shared) keeps the carved model near its dense twin (held-out CE in the report) and costs two
# carves of ~25 s and two routing passes of 6,000 tokens, ~3 s each in bf16, on 2 cores; all 30 layers would
# cost ~+2 nats at top-8 (../shared/reference/carving-an-moe.md) and minutes more. Its SAE (1,152
# latents, k = 32) sees 48,000 tokens in ~23 s (bf16): far fewer than a good SAE of a real model needs
# (held-out FVU ~0.45 where millions of tokens give ~0.1), as much as the budget allows. The tiny
# recipe's carve is measured on 2,048 held-out tokens: fewer hold one document, of one domain.
DEMO_CARVES = {"demo": DemoCarve("smollm2", (12, 13, 14, 15)),
               "tiny": DemoCarve("dense-twin", (0, 1), experts=8, top_k=4, calibration_tokens=512, eval_tokens=2048,
                                 eval_ks=(2, 4, 7), ctx_len=64, route_tokens=2000, dtype="float32", sae_tokens=4_000,
                                 sae_k=8, sae_eval_tokens=512, map_tokens=1_000)}


@dataclass
class CarvedStage:
    """What stage 5 hands on: its key; the experts to describe (a routing run of the clustered carve
    and its middle carved layer) and the features (its SAE's run folder and name); None when skipped."""

    key: str
    experts: tuple[Path, int] | None = None
    features: tuple[Path, str] | None = None


def _carved(corpus_dir: Path, out_dir: Path, run_dir: Path, stats_key: str, recipe: str, dense_dir: Path,
            cache_dir, console: Console) -> CarvedStage:
    """Stage 5: the dense model carved into an MoE twice (co-activation clusters; a random split, the
    null), each routed on held-out text with its statistics, every MoE's experts measured as
    specialists against the domain-permutation null, and a block-input SAE of the clustered carve's
    middle carved layer with its evaluation and feature ↔ expert map (STUDY/carved/)."""
    from deepseemoe.compare.specialists import expert_specialists, specialists_markdown
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.runs.study import CARVE, SPECIALISTS, read_specialists, save_carve, save_specialists
    from deepseemoe.zoo.carve import CarveSpec, carve_zoo

    plan = _carve_plan(recipe)
    model = dense_dir if plan.model == "dense-twin" else None
    folder = out_dir / "carved"
    carves = {}
    try:
        for split in ("clustered", "random"):
            spec = CarveSpec(experts=plan.experts, shared=plan.shared, top_k=plan.top_k, layers=list(plan.layers),
                             split=split)
            with console.status(f"[bold]5/11 carved MoE[/] carving {'SmolLM2-135M' if model is None else dense_dir.name} "
                                f"({split} split)"):
                carves[split] = carve_zoo(corpus_dir, model=model, spec=spec, cache_dir=cache_dir,
                                          calibration_tokens=plan.calibration_tokens, eval_tokens=plan.eval_tokens,
                                          ctx_len=plan.ctx_len, eval_ks=list(plan.eval_ks), progress=False)
    except DeepSeeMoEError as e:  # SmolLM2 is not installed: the rest of the demo stands
        console.print(f"[bold]5/11 carved MoE[/] [yellow]skipped: {e}[/]")
        return CarvedStage(stamp.digest(stage="carved", stats=stats_key, carved=None))
    dtype = _inference_dtype(recipe)
    layer = plan.layers[len(plan.layers) // 2]
    sae = _carved_sae(plan, corpus_dir, carves["clustered"].moe_dir, folder / "dictionaries", layer, dtype)
    route_kw = dict(ctx_len=plan.ctx_len, batch_size=8, max_tokens=plan.route_tokens)
    key = stamp.digest(stage="carved", stats=stats_key, carves={s: c.report["key"] for s, c in carves.items()},
                       dtype=dtype, sae={k: v for k, v in sae.to_dict().items() if k not in ("model", "data", "out")},
                       sae_eval_tokens=plan.sae_eval_tokens, map_tokens=plan.map_tokens, **route_kw)
    runs = {s: folder / s for s in carves}
    name = sae.coders[0].name
    dictionaries = _CarvedDictionary(folder / "dictionaries", name)
    if stamp.fresh(out_dir, "carved", key, [f"carved/{SPECIALISTS}", f"carved/{CARVE}", *dictionaries.outputs(out_dir)]):
        result = read_specialists(folder)
        how = "reused"
    else:
        source = TextSource(str(corpus_dir / "val.jsonl"), domain_field="domain", interleave_domains=True)
        for split, c in carves.items():
            with console.status(f"[bold]5/11 carved MoE[/] routing held-out text ({split} split, {dtype})"):
                route_corpus(load_model(str(c.moe_dir), dtype=dtype), source, runs[split], progress=False,
                             overwrite=True, extra={"carved": str(c.root), "split": split}, **route_kw)
                save_routing_stats(compute_routing_stats(runs[split]))
        result = expert_specialists({"trained": run_dir, "carved": runs["clustered"],
                                     "carved, random split": runs["random"]}).to_json()
        with console.status(f"[bold]5/11 carved MoE[/] a block-input SAE of layer {layer} ({sae.tokens:,} tokens), "
                            "its evaluation and feature map"):
            dictionaries.build(sae, corpus_dir / "val.jsonl", plan, runs["clustered"])
        save_carve(folder, {s: {**c.report, "routing_run": s} for s, c in carves.items()})
        save_specialists(folder, result, specialists_markdown(result))
        stamp.write(out_dir, "carved", key)
        how = ", ".join(f"{s} " + ("cached" if c.cached else f"carved in {c.report['seconds']} s")
                        for s, c in carves.items())
    ce = carves["clustered"].report["ce"]
    k = str(plan.top_k)
    mean = {label: m["mean"] for label, m in result["models"].items()}
    console.print(f"[bold]5/11 carved MoE[/] ({how}) layers {plan.layers[0]}-{plan.layers[-1]}, top-{k} of "
                  f"{plan.experts - plan.shared} + {plan.shared} shared: held-out CE +"
                  f"{ce['carved'][k]['all'] - ce['dense']['all']:.3f} nats over the dense twin; domain NMI of top-1 "
                  "(null): " + ", ".join(f"{label} {m['nmi']:.3f} ({m['nmi_null_mean']:.3f})" for label, m in mean.items()))
    console.print("           " + dictionaries.line(dtype), soft_wrap=True)
    return CarvedStage(key, (runs["clustered"], layer), (dictionaries.folder, name))


def _carved_sae(plan: DemoCarve, corpus_dir: Path, moe_dir: Path, out: Path, layer: int, dtype: str):
    """The run config of the carved MoE's block-input SAE (the router's input) at `layer`. Where "auto"
    fell back to float32 (a CPU without fast bf16), half the tokens: capturing them takes ~2.7x longer
    there, and the demo's budget holds the same seconds, not the same tokens."""
    from deepseemoe.dictionaries.config import CoderSpec, RunSpec
    from deepseemoe.dictionaries.trainer import TrainConfig

    tokens = plan.sae_tokens // 2 if plan.dtype == "auto" and dtype == "float32" else plan.sae_tokens

    # small batches: the few tokens the budget allows still make a few hundred steps
    return RunSpec(model=str(moe_dir), data=str(corpus_dir / "train.jsonl"), out=str(out), tokens=tokens,
                   ctx_len=plan.ctx_len, domain_field="domain", checkpoint_every=10**9, dtype=dtype,
                   coders=[CoderSpec(kind="sae", site="block_in", layers=[layer], k=plan.sae_k,
                                     expansion_factor=plan.sae_expansion)],
                   train=TrainConfig(batch_size=128, buffer_size=8192, lr=2e-3, dead_after_tokens=tokens))


@dataclass
class _CarvedDictionary:
    """The carved MoE's SAE run (STUDY/carved/dictionaries/): trained, evaluated, mapped to the experts
    (and its feature–expert graph, when any edge clears the thresholds)."""

    folder: Path
    name: str

    def outputs(self, out_dir: Path) -> list[str]:
        rel = self.folder.relative_to(out_dir)
        return [f"{rel}/{EVALUATION}", f"{rel}/maps/{self.name}/summary.json"]

    def build(self, spec, val: Path, plan: DemoCarve, routing_run: Path) -> None:
        import shutil

        from deepseemoe.demo.analyses import demo_maps
        from deepseemoe.dictionaries.evaluate import evaluate_run
        from deepseemoe.dictionaries.training import train_run

        if self.folder.exists():
            shutil.rmtree(self.folder)
        train_run(spec, progress=False)
        run = DictionaryRun(self.folder)
        run.save_evaluation(evaluate_run(self.folder, data=str(val), tokens=plan.sae_eval_tokens, progress=False))
        demo_maps(run, [self.name], str(val), plan.map_tokens, routing_run)

    def line(self, dtype: str) -> str:
        run = DictionaryRun(self.folder)
        ev = run.evaluation()["coders"][self.name]
        m = run.map_summaries()[self.name]
        rp = m.get("routing_prediction") or {}
        recall = ", ".join(f"{label} {rp[k]:.2f}" for k, label in (("features", "from its features"),
                                                                   ("token", "token identity"),
                                                                   ("load_only", "load alone"))
                           if isinstance(rp.get(k), float))
        return (f"its block-input SAE {self.name} ({dtype}): held-out FVU {ev['fvu']:.3f}, ΔCE spliced "
                f"{ev.get('delta_ce', float('nan')):.3f}; routing recall@{m['top_k']} {recall or '–'} → {self.folder}")


def _carve_plan(recipe: str) -> DemoCarve:
    """What the demo carves for `recipe` (its ternary twin carves the same)."""
    return DEMO_CARVES.get(recipe.removesuffix("-ternary"), DEMO_CARVES["demo"])


def _inference_dtype(recipe: str) -> str:
    """The dtype the demo runs SmolLM2 and its carved MoE in after carving (DemoCarve.dtype)."""
    from deepseemoe.models.load import faster_cpu_dtype

    plan = _carve_plan(recipe)
    return faster_cpu_dtype() if plan.dtype == "auto" else plan.dtype


def _explainer(cache_dir, explainer, dtype: str = "float32") -> tuple[Path, object, object]:
    """(the cache root, the chat backend that writes descriptions, the judge that scores them): the
    offline SmolLM2 (in `dtype`) and MiniLM unless `explainer` is given (it then judges too). Without
    SmolLM2: (root, None, the reason)."""
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.explain.backends import LocalChat
    from deepseemoe.explain.embedding import EmbeddingJudge
    from deepseemoe.zoo.train import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        chat = explainer or LocalChat.smollm2(root / "explain", dtype=dtype)
    except DeepSeeMoEError as e:
        return root, None, e
    try:  # the judge: a sentence embedder when installed (SmolLM2 cannot judge: explain/embedding.py), else the explainer
        judge = EmbeddingJudge.minilm() if explainer is None else None
    except DeepSeeMoEError:
        judge = None
    return root, chat, judge


def _describe(run_dir: Path, out_dir: Path, layer: int, experts: tuple[Path, int],
              features: dict[str, tuple[Path, str]], cache_dir, explainer, dtype: str, console: Console, key: str,
              separate: tuple | None = None) -> str:
    """Stage 7: the experts of one layer (`experts`: a routing run and the layer) and 8 features of
    each SAE (`features`: label -> its run folder and name: the trained MoE's at `layer` and the
    carved MoE's), explained (by SmolLM2 in `dtype` unless `explainer` is given) and scored; answers
    cached, so a warm demo asks the explainer nothing, and the whole stage is
    reused when its inputs (`key`: the analyses before it; the explainer) did not change. With
    `separate` (the separately trained model, the held-out source, the routing settings): that
    model's experts of the same layer too, and how often each MoE's expert descriptions name the
    expert's domain. Returns the stage's key."""
    from deepseemoe.explain.backends import Cached
    from deepseemoe.explain.pipeline import demo_explanations
    from deepseemoe.runs.explanations import ExplanationStore

    root, chat, judge = _explainer(cache_dir, explainer, dtype)
    if chat is None:  # the offline explainer is not installed: the rest of the demo stands
        console.print(f"[bold]7/11 descriptions[/] [yellow]skipped: {judge}[/]")
        return stamp.digest(stage="descriptions", analyses=key, explainer=None)
    key = stamp.digest(stage="descriptions", analyses=key, explainer=chat.ident, judge=judge.ident if judge else None)
    expert_run, expert_layer = experts
    stores = {"experts": ExplanationStore.for_experts(expert_run, expert_layer),
              **{label: ExplanationStore.for_features(*f) for label, f in features.items()}}
    cached = ""
    if stamp.fresh(out_dir, "descriptions", key, [str(st.summary_path.relative_to(out_dir))
                                                  for st in stores.values()]):
        got = {k: st.summary() for k, st in stores.items()}
        cached = "reused: "
    else:
        backend = Cached(chat, root / "explain" / "answers.sqlite")
        with console.status("[bold]7/11 descriptions[/] explaining experts and features"):
            got = demo_explanations(expert_run, expert_layer, features, backend, judge=judge)
        if separate is not None:
            _describe_separate(run_dir, out_dir, layer, backend, judge, *separate)
        stamp.write(out_dir, "descriptions", key)
        cached = f"({backend.hits} answers cached, {backend.misses} new) "
    e = got["experts"]["scorers"]
    f = {label: got[label]["scorers"].get("detection") for label in features}
    console.print(f"[bold]7/11 descriptions[/] {cached}{got['experts']['units']} experts, "
                  + ", ".join(f"{got[label]['units']} {label}" for label in features)
                  + f" by {chat.ident.split(':', 1)[1]}, judged by "
                  f"{(judge.ident if judge else chat.ident).split(':', 1)[1]}: routing prediction "
                  f"{_score(e.get('routing'))} (shuffled {_score((e.get('routing') or {}).get('shuffled_explanation'))}, "
                  f"token identity {_score((e.get('routing') or {}).get('token_baseline'))}); detection "
                  + "; ".join(f"{label} {_score(d)} (shuffled {_score((d or {}).get('shuffled_explanation'))})"
                              for label, d in f.items()) + _judge_note(got))
    console.print("           beat the shuffled baseline by more than the spread over units: "
                  f"experts {_verdict(e.get('routing'))}; "
                  + "; ".join(f"{label} {_verdict(d)}" for label, d in f.items()))
    return key


# the demo's prompts: the opening of one held-out document per domain, this many tokens (a graph of
# 32 tokens takes ~2 s on 2 cores with the demo's MoE and its layer SAE)
PROMPT_TOKENS = 32


def _attribution(out_dir: Path, corpus_dir: Path, moe_dir: Path, layer: int, key: str, console: Console) -> str:
    """Stage 8: an attribution graph through the router (`deepseemoe attribute`) of the opening of one
    held-out document per domain, with the trained MoE's block-input SAE of `layer`, into
    STUDY/attribution/. Returns the stage's key."""
    from deepseemoe.attribution.prompts import attribute_prompt, document_openings
    from deepseemoe.dictionaries.formats import load_run_dictionary
    from deepseemoe.explain.mapping import feature_descriptions
    from deepseemoe.runs.study import ATTRIBUTION, save_attribution

    key = stamp.digest(stage="attribution", descriptions=key, prompt_tokens=PROMPT_TOKENS)
    folder = out_dir / "attribution"
    if stamp.fresh(out_dir, "attribution", key, [f"attribution/{ATTRIBUTION}"]):
        console.print(f"[bold]8/11 attribution graphs[/] reused {folder}")
        return key
    dict_dir, name = out_dir / "dictionaries", f"sae_block_in_{layer}"
    handle = load_model(str(moe_dir), dtype="float32")  # edges are sums of many small products
    prompts = document_openings(corpus_dir / "val.jsonl", handle.require_tokenizer(), tokens=PROMPT_TOKENS)
    dictionaries = {name: load_run_dictionary(dict_dir, name)}
    descriptions = feature_descriptions(dict_dir, [name])
    graphs = []
    with console.status("[bold]8/11 attribution graphs[/] one held-out prompt per domain"):
        for domain, prompt in prompts.items():
            slug = "".join(c if c.isalnum() else "-" for c in domain)
            g = attribute_prompt(handle, dictionaries, prompt, label=domain, scan=str(moe_dir), slug=slug,
                                 descriptions=descriptions)
            graphs.append((slug, g.doc, g.index_entry()))
    save_attribution(folder, graphs, {"model": str(moe_dir), "dictionaries": [str(dict_dir / name)],
                                      "prompt_tokens": PROMPT_TOKENS})
    stamp.write(out_dir, "attribution", key)
    kept = sorted(e["summary"]["kept_influence"] for _, _, e in graphs)
    console.print(f"[bold]8/11 attribution graphs[/] {len(graphs)} prompts (one per domain), {PROMPT_TOKENS} tokens, "
                  f"with {name}: {sum(e['seconds'] for _, _, e in graphs):.1f} s; pruned graphs keep "
                  f"{kept[0]:.0%}–{kept[-1]:.0%} of the influence → {folder}")
    for _, _, e in graphs[:1]:
        console.print(f"           {e['label']}: {e['sentence']}", soft_wrap=True)
    return key


@dataclass(frozen=True)
class DemoPostTrain:
    """What the demo post-trains: every strategy and the dense twin at the matched budget, 3 seeds,
    on the domain the MoE knows least (the highest held-out loss), small enough for the demo's budget."""

    steps: int
    batch_size: int
    ctx_len: int
    train_tokens: int
    eval_tokens: int
    seeds: int = 3
    rank: int = 4
    lr: float = 3e-3


# demo: 21 points (6 strategies and the dense twin × 3 seeds) of 12 steps of 8 × 128 tokens, measured on 6,144
# held-out tokens (1,024 per domain), in ~40 s on 2 cores (8 steps: 30 s, but the dense twin's gain is then
# within its seeds' spread); each point's adapters are kept (not 21 merged models on disk)
DEMO_POSTTRAIN = {"demo": DemoPostTrain(steps=12, batch_size=8, ctx_len=128, train_tokens=12_288, eval_tokens=6_144,
                                        lr=3e-3),
                  "tiny": DemoPostTrain(steps=3, batch_size=4, ctx_len=64, train_tokens=1_024, eval_tokens=1_024)}


def _least_known(zoo) -> str | None:
    """The domain of the highest held-out loss of the MoE in the zoo's training report."""
    loss = read_json(zoo.root / "report.json", "train the zoo models again (--retrain)")["val_loss"]["moe"]
    return max(loss, key=loss.get) if loss else None


def _post_train(out_dir: Path, corpus_dir: Path, zoo, layer: int, recipe: str, console: Console) -> str:
    """Stage 9: `deepseemoe post-train` of the MoE and its dense twin on the domain the MoE knows least,
    every strategy, the hint from the block-input SAE of `layer` and its map (stage 6), into
    STUDY/posttrain/. Returns the stage's key."""
    from deepseemoe.posttrain.lora import STRATEGIES
    from deepseemoe.posttrain.study import PostTrainSettings, post_train
    from deepseemoe.runs.dictionary import DictionaryRun

    size = DEMO_POSTTRAIN.get(recipe.removesuffix("-ternary"), DEMO_POSTTRAIN["tiny"])
    target = _least_known(zoo)
    folder = out_dir / "posttrain"
    hint, name = DictionaryRun(out_dir / "dictionaries"), f"sae_block_in_{layer}"
    settings = PostTrainSettings(
        model=str(zoo.moe_dir), data=str(corpus_dir / "train.jsonl"), eval=str(corpus_dir / "val.jsonl"),
        out=str(folder), strategies=list(STRATEGIES), target_domain=target, dense=str(zoo.dense_dir),
        hint=f"{hint.path}:{name}", seeds=size.seeds, steps=size.steps, rank=size.rank, lr=size.lr,
        batch_size=size.batch_size, ctx_len=size.ctx_len, train_tokens=size.train_tokens, eval_tokens=size.eval_tokens,
        keep_adapters=True)
    # its inputs: the two models, the text, the hint's dictionary and map, the settings (not the stages
    # before it: a new description or graph does not change what post-training measures)
    key = stamp.digest(stage="posttrain", settings=settings.to_dict(),
                       moe=stamp.model_digest(zoo.moe_dir), dense=stamp.model_digest(zoo.dense_dir),
                       text=[stamp.file_digest(corpus_dir / n) for n in ("train.jsonl", "val.jsonl")],
                       hint=[hint.coder_digest(name), *(stamp.file_digest(p) for p in hint.map_files(name))])
    if stamp.fresh(out_dir, "posttrain", key, ["posttrain/table.json"]):
        console.print(f"[bold]9/11 post-training[/] reused {folder}")
        return key
    if folder.exists():  # another demo's study (other models, text or code): not to be mixed with this one
        import shutil

        shutil.rmtree(folder)
    points = size.seeds * (len(STRATEGIES) + 1)
    with console.status(f"[bold]9/11 post-training[/] LoRA on '{target}', {len(STRATEGIES)} strategies and the dense "
                        f"twin × {size.seeds} seeds ({points} points of {size.steps} steps)"):
        result = post_train(settings)
    stamp.write(out_dir, "posttrain", key)
    rows = {r["strategy"]: r for r in result.rows}
    h = result.hint
    console.print(f"[bold]9/11 post-training[/] on '{target}', hint: layer {h['layer']} experts {h['experts']} → "
                  f"{folder}")
    for strategy in ("all", "router-by-hint", "experts-by-hint", "random-experts", "dense-all"):
        r = rows.get(strategy)
        if r:
            console.print(f"           {strategy}: target ΔCE {r['target_delta_ce']:+.3f}, forgetting {r['forgetting']:+.3f}"
                          + ("" if strategy == "dense-all" else f", routing drift {r['drift']:.3f}"))
    return key


@dataclass(frozen=True)
class DemoSweep:
    """The demo's reach sweep (`deepseemoe sweep`): CLTs over every layer of the demo MoE."""

    latents_per_layer: int
    k: int
    neighbours: tuple[int | str, ...]
    seeds: tuple[int, ...]
    kinds: tuple[str, ...]
    tokens: int
    eval_tokens: int
    ctx_len: int


# demo: 3 reaches × 2 seeds over the 4 layers, 128 latents per layer, 24k training tokens, 2,048 held-out,
# and at the same totals one SAE per layer on the block outputs and a crosscoder over them: ~15 s on
# 2 cores (its dictionaries are small and undertrained; the table's last sentence says so)
DEMO_SWEEP = {"demo": DemoSweep(128, 4, (0, 1, "all"), (0, 1), ("clt", "sae", "crosscoder"), 24_000, 2_048, 128),
              "tiny": DemoSweep(32, 2, (0, "all"), (0, 1), ("clt", "sae", "crosscoder"), 2_048, 512, 64)}


def _sweep(out_dir: Path, corpus_dir: Path, zoo, recipe: str, console: Console) -> str:
    """Stage 10: `deepseemoe sweep` on the demo MoE into STUDY/sweep/: one CLT per reach at equal
    latents and L0, 2 seeds, and which layer to pick. Returns the stage's key. (Without the sweep's
    auto-interpretability: 2 features per row on one seed cost 47 s of the budget on 2 cores
    (2026-12-07) and SmolLM2 described too few of them for a shuffled baseline in most rows.)"""
    from deepseemoe.compare.sweep import SweepSettings, run_sweep

    size = DEMO_SWEEP.get(recipe.removesuffix("-ternary"), DEMO_SWEEP["tiny"])
    layers = list(range(int(read_json(zoo.moe_dir / "config.json", "train the zoo models again (--retrain)")
                            ["num_hidden_layers"])))
    folder = out_dir / "sweep"
    raw = {"model": str(zoo.moe_dir), "data": str(corpus_dir / "train.jsonl"), "eval": str(corpus_dir / "val.jsonl"),
           "domain_field": "domain", "out": str(folder), "tokens": size.tokens, "ctx_len": size.ctx_len,
           "eval_tokens": size.eval_tokens, "train": {"batch_size": 512, "buffer_size": 4096, "lr": 2e-3},
           "sweep": {"layers": layers, "latents_per_layer": size.latents_per_layer, "k": size.k,
                     "neighbours": list(size.neighbours), "seeds": list(size.seeds), "kinds": list(size.kinds)}}
    key = stamp.digest(stage="sweep", settings=raw, moe=stamp.model_digest(zoo.moe_dir),
                       text=[stamp.file_digest(corpus_dir / n) for n in ("train.jsonl", "val.jsonl")])
    if stamp.fresh(out_dir, "sweep", key, ["sweep/table.json"]):
        console.print(f"[bold]10/11 which layers, how many neighbours[/] reused {folder}")
        return key
    if folder.exists():  # another demo's sweep (other models, text or code): not to be mixed with this one
        import shutil

        shutil.rmtree(folder)
    with console.status(f"[bold]10/11 which layers, how many neighbours[/] CLTs of reach "
                        f"{', '.join(map(str, size.neighbours))} over layers {layers} × {len(size.seeds)} seeds"):
        result = run_sweep(SweepSettings.from_dict(raw), progress=False)
    stamp.write(out_dir, "sweep", key)
    best = min(result.rows, key=lambda r: r["fvu"])
    first = result.which_layer[0]["layer"] if result.which_layer else None
    console.print(f"[bold]10/11 which layers, how many neighbours[/] best FVU at reach {best['reach']} "
                  f"({best['fvu']:.3f}), elbow {result.elbow}; layer {first} ranks first to study → {folder}")
    return key


def _score(entry: dict | None) -> str:
    """A scorer's balanced accuracy and AUROC (the scorer's entry, or a baseline's metrics)."""
    if not entry:
        return "–"
    m = entry.get("explanation", entry)
    ba, auc = m.get("balanced_accuracy"), m.get("auroc")
    text = "–" if ba is None or ba != ba else f"{ba:.2f}"
    return text + (f", AUROC {auc:.2f}" if auc is not None else "")


def _verdict(entry: dict | None) -> str:
    """Whether a scorer's descriptions beat the shuffled baseline (explain.scorers.versus_shuffled)."""
    v = (entry or {}).get("versus_shuffled")
    if not v or v["beats"] is None:
        return "cannot tell (fewer than two units scored)"
    return (("yes" if v["beats"] else "no") + f" ({'AUROC' if v['measure'] == 'auroc' else 'balanced accuracy'} "
            f"{v['gain']:+.3f} ± {v['spread']:.3f} over {v['units']} units)")


def _judge_note(got: dict) -> str:
    flags = {f"{k} {name}": entry["explanation"]["judge"]["flag"] for k, s in got.items()
             for name, entry in s["scorers"].items() if entry["explanation"].get("judge", {}).get("flag")}
    undescribed = sum(s.get("undescribed", 0) for s in got.values())
    note = f"; {undescribed} units without a usable description" if undescribed else ""
    return note + "".join(f"; [yellow]the judge of {k} {v}[/]" for k, v in flags.items())


def _describe_separate(run_dir: Path, out_dir: Path, layer: int, backend, judge, models, source, route_kw: dict) -> None:
    """The separately trained model's experts described like the joint MoE's, then for both MoEs
    the share of expert descriptions that name the expert's domain (the separate model's: the
    domain it was trained on; the joint MoE's: the domain it takes the largest share of), added to
    the comparison."""
    from deepseemoe.compare.domains import descriptions_naming, preferred_domains
    from deepseemoe.data.demo_corpus import DOMAIN_WORDS
    from deepseemoe.explain.pipeline import demo_expert_explanations
    from deepseemoe.models.handle import declared_expert_names
    from deepseemoe.report.tables import comparison_markdown
    from deepseemoe.runs.explanations import ExplanationStore
    from deepseemoe.runs.study import read_comparison, save_comparison

    handle = load_model(str(models.model_dir))
    sep_run = out_dir / "separate" / "run"
    route_corpus(handle, source, sep_run, progress=False, overwrite=True, **route_kw)
    demo_expert_explanations(sep_run, layer, backend, judge=judge)
    if ExplanationStore.for_experts(run_dir, layer).summary() is None:  # the carved MoE's were described
        demo_expert_explanations(run_dir, layer, backend, judge=judge)
    names = declared_expert_names(handle.model.config) or []

    def described(run: Path) -> dict[int, str]:
        return ExplanationStore.for_experts(run, layer).explanations()

    folder = out_dir / "compare"
    comparison = read_comparison(folder)
    comparison["descriptions"] = {
        "layer": layer,
        "moe": descriptions_naming(described(run_dir), preferred_domains(run_dir, layer), DOMAIN_WORDS),
        "separate": descriptions_naming(described(sep_run), {e: n for e, n in enumerate(names) if e > 0},
                                        DOMAIN_WORDS)}
    save_comparison(folder, comparison, comparison_markdown(comparison))
