"""`deepseemoe demo`: the whole pipeline on the offline default, from nothing to a report.

Stages: corpus (text on this machine) → tokenizer + MoE + dense twin (trained once, cached) →
load the MoE from its folder exactly like a hub model → route the held-out split → route the
same text through the intermediate checkpoints → routing statistics → dictionaries, feature maps,
causal checks and the MoE-vs-dense table → descriptions of one layer's experts and a few dozen
features by the offline explainer (SmolLM2), scored → report/index.html.
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
        console.print(f"[bold]1/7 corpus[/] reused {corpus_dir}")
    else:
        with console.status("[bold]1/7 corpus[/] collecting text found on this machine"):
            corpus = build_corpus(corpus_dir, seed=seed, max_bytes_per_domain=spec.max_bytes_per_domain).to_json()
        atomic_write_json(built_path, built)
        console.print(f"[bold]1/7 corpus[/] {len(corpus['domains'])} domains: "
                      + ", ".join(f"{d} {v['bytes'] / 1e6:.1f} MB" for d, v in corpus["domains"].items()))
    for note in corpus.get("notes", []):
        console.print(f"[yellow]{note}[/]")
    seconds["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    console.print(f"[bold]2/7 models[/] recipe '{recipe}': OLMoE {spec.experts} experts top-{spec.top_k} and its "
                  f"dense twin, {spec.steps} steps each")
    zoo = train_zoo(corpus_dir, recipe=spec, cache_dir=cache_dir, retrain=retrain)
    console.print(f"           {'reused' if zoo.cached else 'trained'}: MoE {zoo.moe_dir}", soft_wrap=True)
    console.print(f"           dense twin {zoo.dense_dir}", soft_wrap=True)
    third = None
    if separate:
        from deepseemoe.zoo.flexolmo import train_separate

        console.print("[bold]2/7 models[/] and experts trained separately: a public base, one expert per domain, "
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
        console.print(f"[bold]3/7 routing[/] reused {run_dir}")
    else:
        console.print("[bold]3/7 routing[/] held-out text through the MoE (loaded from its folder like a hub model)")
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
        summary = RoutingRun.open(run_dir).analyses().summary
        console.print(f"[bold]4/7 statistics[/] reused {run_dir / 'analyses'}")
    else:
        with console.status("[bold]4/7 statistics[/]"):
            save_routing_stats(compute_routing_stats(run_dir))
        summary = RoutingRun.open(run_dir).analyses().summary  # as saved (with its inputs): what a warm run reads
        stamp.write(out_dir, "stats", key)
        console.print(f"[bold]4/7 statistics[/] {summary['tokens']:,} tokens → {run_dir / 'analyses'}")
    seconds["stats"] = time.perf_counter() - t

    t = time.perf_counter()
    from deepseemoe.analysis.demo_stage import demo_analyses_outputs, read_demo_analyses, run_demo_analyses

    key = stamp.digest(stage="analyses", stats=key, dense=stamp.model_digest(zoo.dense_dir),
                       train=stamp.file_digest(corpus_dir / "train.jsonl"),
                       separate=stamp.model_digest(third.model_dir) if third is not None else None)
    if stamp.fresh(out_dir, "analyses", key, demo_analyses_outputs(spec.layers // 2)):
        analyses = read_demo_analyses(out_dir)
        console.print("[bold]5/7 dictionaries and causal checks[/] reused")
    else:
        with console.status("[bold]5/7 dictionaries and causal checks[/]"):
            analyses = run_demo_analyses(zoo.moe_dir, zoo.dense_dir, corpus_dir, out_dir, ctx_len=spec.seq_len,
                                         train_tokens=max(10_000, min(100_000, 2 * max_tokens)),
                                         eval_tokens=max(1_000, min(4_000, max_tokens // 4)), layer=spec.layers // 2,
                                         separate=third)
        stamp.write(out_dir, "analyses", key)
    ev = analyses["evaluation"]["coders"]
    console.print("[bold]5/7 dictionaries and causal checks[/] " + ", ".join(
        f"{n}: FVU {r['fvu']:.3f}, ΔCE {r.get('delta_ce', float('nan')):.3f}" for n, r in ev.items()))
    if analyses["removal"] is not None:
        rm = analyses["removal"]
        console.print(f"  removing {rm['target']['label']}: ΔCE on it / elsewhere — " + "; ".join(
            f"{label} {kind.replace('_', ' ')}s {k['selected']['target']:.3f} / {k['selected']['off_target']:.3f}"
            for label, m in rm["models"].items() for kind, k in m["kinds"].items() if kind != "attention_head"))
    seconds["analyses"] = time.perf_counter() - t

    t = time.perf_counter()
    key = _describe(run_dir, out_dir, spec.layers // 2, cache_dir, explainer, console, key,
                    separate=(third, source, route_kw) if third is not None else None)
    seconds["descriptions"] = time.perf_counter() - t

    t = time.perf_counter()
    key = stamp.digest(stage="report", descriptions=key)
    report = out_dir / "report" / "index.html"
    if stamp.fresh(out_dir, "report", key, ["report/index.html"]):
        console.print(f"[bold]7/7 report[/] reused {report}")
    else:
        report = build_report(run_dir)  # what `deepseemoe report runs/demo/run` writes, from the files alone
        stamp.write(out_dir, "report", key)
        console.print(f"[bold]7/7 report[/] {report}")
    seconds["report"] = time.perf_counter() - t
    return DemoResult(out_dir, report, seconds, summary)


def _describe(run_dir: Path, out_dir: Path, layer: int, cache_dir, explainer, console: Console, key: str,
              separate: tuple | None = None) -> str:
    """Stage 6: the experts of one layer and 8 features of the block-input SAE, explained and
    scored; answers cached, so a warm demo asks the explainer nothing, and the whole stage is
    reused when its inputs (`key`: the analyses before it; the explainer) did not change. With
    `separate` (the separately trained model, the held-out source, the routing settings): that
    model's experts of the same layer too, and how often each MoE's expert descriptions name the
    expert's domain. Returns the stage's key."""
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.explain.backends import Cached, LocalChat
    from deepseemoe.explain.pipeline import demo_explanations
    from deepseemoe.runs.explanations import ExplanationStore
    from deepseemoe.zoo.train import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        chat = explainer or LocalChat.smollm2(root / "explain")
    except DeepSeeMoEError as e:  # the offline explainer is not installed: the rest of the demo stands
        console.print(f"[bold]6/7 descriptions[/] [yellow]skipped: {e}[/]")
        return stamp.digest(stage="descriptions", analyses=key, explainer=None)
    key = stamp.digest(stage="descriptions", analyses=key, explainer=chat.ident)
    stores = {"experts": (run_dir / "explanations" / f"layer{layer}", f"layer{layer}.experts"),
              "features": (out_dir / "dictionaries" / "explanations" / f"sae_block_in_{layer}", f"sae_block_in_{layer}")}
    cached = ""
    if stamp.fresh(out_dir, "descriptions", key, [str(p.relative_to(out_dir) / "summary.json") for p, _ in stores.values()]):
        got = {k: ExplanationStore(p, m).summary() for k, (p, m) in stores.items()}
        cached = "reused: "
    else:
        backend = Cached(chat, root / "explain" / "answers.sqlite")
        with console.status("[bold]6/7 descriptions[/] explaining experts and features"):
            got = demo_explanations(run_dir, out_dir / "dictionaries", f"sae_block_in_{layer}", layer, backend)
        if separate is not None:
            _describe_separate(run_dir, out_dir, layer, backend, *separate)
        stamp.write(out_dir, "descriptions", key)
        cached = f"({backend.hits} answers cached, {backend.misses} new) "
    e, f = got["experts"]["scorers"], got["features"]["scorers"]
    console.print(f"[bold]6/7 descriptions[/] {cached}{got['experts']['units']} experts, {got['features']['units']} "
                  f"features by {chat.ident.split(':', 1)[1]}: routing prediction "
                  f"{_score(e.get('routing'))} (shuffled {_score((e.get('routing') or {}).get('shuffled_explanation'))}, "
                  f"token identity {_score((e.get('routing') or {}).get('token_baseline'))}); feature detection "
                  f"{_score(f.get('detection'))} (shuffled {_score((f.get('detection') or {}).get('shuffled_explanation'))})"
                  + _judge_note(got))
    return key


def _score(entry: dict | None) -> str:
    """A scorer's balanced accuracy and AUROC (the scorer's entry, or a baseline's metrics)."""
    if not entry:
        return "–"
    m = entry.get("explanation", entry)
    ba, auc = m.get("balanced_accuracy"), m.get("auroc")
    text = "–" if ba is None or ba != ba else f"{ba:.2f}"
    return text + (f", AUROC {auc:.2f}" if auc is not None else "")


def _judge_note(got: dict) -> str:
    flags = {f"{k} {name}": entry["explanation"]["judge"]["flag"] for k, s in got.items()
             for name, entry in s["scorers"].items() if entry["explanation"].get("judge", {}).get("flag")}
    undescribed = sum(s.get("undescribed", 0) for s in got.values())
    note = f"; {undescribed} units without a usable description" if undescribed else ""
    return note + "".join(f"; [yellow]the judge of {k} {v}[/]" for k, v in flags.items())


def _describe_separate(run_dir: Path, out_dir: Path, layer: int, backend, models, source, route_kw: dict) -> None:
    """The separately trained model's experts described like the joint MoE's, then for both MoEs
    the share of expert descriptions that name the expert's domain (the separate model's: the
    domain it was trained on; the joint MoE's: the domain it takes the largest share of), added to
    the comparison."""
    from deepseemoe.analysis.report_tables import comparison_markdown
    from deepseemoe.analysis.routing_compare import descriptions_naming, preferred_domains
    from deepseemoe.data.demo_corpus import DOMAIN_WORDS
    from deepseemoe.explain.pipeline import demo_expert_explanations
    from deepseemoe.models.spec import declared_expert_names
    from deepseemoe.runs.explanations import ExplanationStore
    from deepseemoe.runs.study import COMPARISON, save_comparison

    handle = load_model(str(models.model_dir))
    sep_run = out_dir / "separate" / "run"
    route_corpus(handle, source, sep_run, progress=False, overwrite=True, **route_kw)
    demo_expert_explanations(sep_run, layer, backend)
    names = declared_expert_names(handle.model.config) or []

    def described(run: Path) -> dict[int, str]:
        return ExplanationStore(run / "explanations" / f"layer{layer}", f"layer{layer}.experts").explanations()

    folder = out_dir / "compare"
    comparison = read_json(folder / COMPARISON, f"run `deepseemoe demo --out {out_dir}` again")
    comparison["descriptions"] = {
        "layer": layer,
        "moe": descriptions_naming(described(run_dir), preferred_domains(run_dir, layer), DOMAIN_WORDS),
        "separate": descriptions_naming(described(sep_run), {e: n for e, n in enumerate(names) if e > 0},
                                        DOMAIN_WORDS)}
    save_comparison(folder, comparison, comparison_markdown(comparison))
