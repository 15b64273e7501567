"""The demo's last analysis stage: dictionaries on the demo MoE, their evaluation and feature map,
the causal checks, and the MoE-vs-dense table — small budgets, so the whole demo stays minutes."""

from __future__ import annotations

from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.dictionary import EVALUATION, DictionaryRun
from deepseemoe.runs.study import ABLATION, COMPARISON, save_ablation, save_comparison, save_removal

# the domain the demo removes from the MoE and its dense twin (the first of these the corpus has)
REMOVAL_DOMAINS = ("ru", "code")


def run_demo_analyses(moe_dir: Path, dense_dir: Path, corpus_dir: Path, out_dir: Path, *, ctx_len: int,
                      train_tokens: int = 100_000, eval_tokens: int = 4_000, layer: int = 2, separate=None) -> dict:
    """`separate`: the zoo's FlexOlmo-style model (`SeparateModels`), compared as the third model."""
    from deepseemoe.causal.checks import run_causal_checks
    from deepseemoe.causal.figures import causal_figures
    from deepseemoe.compare.frontier import dictionary_comparison
    from deepseemoe.compare.selectivity import compare_models
    from deepseemoe.data.tokens import heldout_batches
    from deepseemoe.dictionaries.config import CoderSpec, RunSpec
    from deepseemoe.dictionaries.evaluate import evaluate_run
    from deepseemoe.dictionaries.trainer import TrainConfig
    from deepseemoe.dictionaries.training import train_run
    from deepseemoe.models.load import load_model
    from deepseemoe.report.tables import comparison_markdown

    train, val = str(corpus_dir / "train.jsonl"), str(corpus_dir / "val.jsonl")
    dict_dir = out_dir / "dictionaries"
    spec = RunSpec(model=str(moe_dir), data=train, out=str(dict_dir), tokens=train_tokens, ctx_len=ctx_len,
                   domain_field="domain", checkpoint_every=10**9,
                   coders=[CoderSpec(kind="sae", site="block_in", layers=[layer], k=16, expansion_factor=8),
                           CoderSpec(kind="skip_transcoder", layers=[layer], activation="batchtopk", k=16,
                                     expansion_factor=8)],
                   train=TrainConfig(batch_size=1024, buffer_size=8192, lr=1e-3, dead_after_tokens=50_000))
    run = DictionaryRun(dict_dir)
    # the dictionaries are reused only when what they were trained and evaluated on is unchanged (the
    # MoE's weights, the text, the settings, the code): a retrained MoE gets new ones
    from deepseemoe.runs import stamp

    key = stamp.digest(stage="dictionaries", moe=stamp.model_digest(moe_dir), train=stamp.file_digest(train),
                       val=stamp.file_digest(val), eval_tokens=eval_tokens,
                       spec={k: v for k, v in spec.to_dict().items() if k not in ("model", "data", "out")})
    if not stamp.fresh(dict_dir, "dictionaries", key, [EVALUATION]):
        if dict_dir.exists():
            import shutil

            shutil.rmtree(dict_dir)
        train_run(spec, progress=False)
        run.save_evaluation(evaluate_run(dict_dir, data=val, tokens=eval_tokens, progress=False))
        stamp.write(dict_dir, "dictionaries", key)
    evaluation = run.evaluation()
    maps, graphs = demo_maps(run, [c.name for c in spec.coders], val, 4 * eval_tokens, out_dir / "run")

    moe, dense = load_model(str(moe_dir)), load_model(str(dense_dir))
    moe_text, dense_text = (heldout_batches(h, val, tokens=eval_tokens, ctx_len=ctx_len) for h in (moe, dense))
    causal = run_causal_checks(moe, moe_text, progress=False)
    save_ablation(out_dir / "ablate", causal, lambda folder: causal_figures(causal, folder))
    third = load_model(str(separate.model_dir)) if separate is not None else None
    comparison = compare_models(moe, dense, moe_text, dense_text, separate=third,
                                batches_separate=heldout_batches(third, val, tokens=eval_tokens, ctx_len=ctx_len)
                                if third is not None else None,
                                max_units_per_kind=16)
    models = {"moe": str(moe_dir), "dense": str(dense_dir)}
    if separate is not None:
        models["separate"] = str(separate.model_dir)
        comparison["val_loss"] = {**separate.report["val_loss"], "unigram": separate.report["unigram_baseline"]}
        comparison["separate_training"] = {k: separate.report[k] for k in ("steps", "tokens", "plan", "experts")}
    comparison.update(dictionary_comparison(models, [label for label in models if label != "dense"], train, val,
                                            out_dir / "compare", layer=layer, ks=[8, 16], expansion_factor=8,
                                            tokens=train_tokens, eval_tokens=eval_tokens, ctx_len=ctx_len))
    save_comparison(out_dir / "compare", comparison, comparison_markdown(comparison))
    removal = demo_removal(moe, dense, moe_text, dense_text, out_dir / "remove",
                           dictionary=(dict_dir, f"sae_block_in_{layer}"))
    return {"evaluation": evaluation, "maps": maps, "graphs": graphs, "causal": causal, "comparison": comparison,
            "removal": removal}


def demo_analyses_outputs(layer: int) -> list[str]:
    """The files `run_demo_analyses` leaves in the demo folder (relative to it): what a warm demo
    needs present to reuse the stage."""
    return [f"dictionaries/{EVALUATION}", f"dictionaries/maps/sae_block_in_{layer}/summary.json",
            f"ablate/{ABLATION}", f"compare/{COMPARISON}"]


def read_demo_analyses(out_dir: Path) -> dict:
    """What `run_demo_analyses` returned, read back from its files (a warm demo's stage 5)."""
    from deepseemoe.runs.study import read_ablation, read_comparison, read_removal

    run = DictionaryRun(out_dir / "dictionaries")
    return {"evaluation": run.evaluation(), "maps": run.map_summaries(), "graphs": run.graph_summaries(),
            "causal": read_ablation(out_dir / "ablate"), "comparison": read_comparison(out_dir / "compare"),
            "removal": read_removal(out_dir / "remove")}


def demo_removal(moe, dense, batches_moe: list, batches_dense: list, out: Path,
                 dictionary: tuple[Path, str] | None = None) -> dict | None:
    """`ablate --target` on the MoE with its dense twin: one domain removed at one expert's share
    (the features of `dictionary`, a (run folder, name) SAE of the MoE, and its graph's modules, unit
    kinds too)."""
    from deepseemoe.causal.figures import removal_figure
    from deepseemoe.causal.removal import load_dictionary, removal_study

    present = {d for b in batches_moe for d in b.domains.values()}
    domain = next((d for d in REMOVAL_DOMAINS if d in present), None) or min(present - {None}, default=None)
    if domain is None:
        return None
    sae = load_dictionary(*dictionary) if dictionary is not None else None
    result = removal_study([("moe", moe, batches_moe), ("dense", dense, batches_dense)], f"domain:{domain}",
                           dictionary=sae)
    save_removal(out, result, lambda path: removal_figure(result, path))
    return result


def demo_maps(run: DictionaryRun, names: list[str], data: str, tokens: int, routing_run: Path) -> tuple[dict, dict]:
    """`deepseemoe map` of each dictionary `names` of a trained run on `tokens` of `data` (one model for
    every map), then `demo_graphs`: (map summaries, graph summaries), by name."""
    from deepseemoe.dictionaries.trained import TrainedRun
    from deepseemoe.features.map import compute_map

    maps = {}
    trained = TrainedRun.open(run.path)
    for name in names:
        m = compute_map(trained, name, data=data, tokens=tokens, layer=None, batch_size=8, n_examples=5)
        run.save_map(name, m.tables, m.examples, m.summary)
        maps[name] = m.summary
    return maps, demo_graphs(run, names, routing_run)


def demo_graphs(run: DictionaryRun, names: list[str], routing_run: Path) -> dict:
    """`deepseemoe graph` on each mapped dictionary at its default thresholds (experts labelled with
    the domains of the routing run's statistics); a map with no edge above them has no graph."""
    from deepseemoe.features.graph import graph_study
    from deepseemoe.runs.routing import RoutingRun

    domains = RoutingRun.open(routing_run).analyses().table("domain")
    out = {}
    for name in names:
        try:
            study = graph_study(run.map_summary(name), run.map_tables(name), domain_table=domains, name=name)
        except DeepSeeMoEError:  # nothing above the thresholds
            continue
        run.save_graph(name, study.tables, study.summary, study.figure)
        out[name] = study.summary
    return out
