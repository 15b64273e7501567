"""`deepseemoe zoo train`: the demo's MoE and dense twin."""

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
    from rich.table import Table

    from deepseemoe.progress import out_console
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
    table = Table(title=f"validation loss, nats/token ({where})")
    for col in ("domain", *columns, "unigram"):
        table.add_column(col)
    for d in sorted(r["val_loss"]["moe"]):
        table.add_row(d, *(f"{v[d]:.3f}" for v in columns.values()), f"{r['unigram_baseline'][d]:.3f}")
    out_console().print(table)
    for kind, t in r.get("ternary", {}).items():
        lines.append(f"{kind}: {', '.join(t['parts'])} ternary, {100 * t['zero_share']:.1f}% of their trits 0")
    out_console().print("\n".join(lines))


@zoo_app.command("list")
def list_models(
    cache_dir: Path = typer.Option(None, help="Model cache (default ~/.cache/deepseemoe or $DEEPSEEMOE_CACHE)."),
) -> None:
    """The models in the cache, with the folders to pass to any verb (route, ablate, wiring, ...)."""
    from rich.table import Table

    from deepseemoe.progress import out_console
    from deepseemoe.zoo.train import default_cache_dir

    root = Path(cache_dir or default_cache_dir()) / "zoo"
    entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    console = out_console()
    if not entries:
        console.print(f"no models in {root} yet; `deepseemoe demo` or `deepseemoe zoo train` makes them", soft_wrap=True)
        return
    table = Table(title=f"models in {root}")
    for col in ("entry", "state", "model", "folder"):
        table.add_column(col)
    for entry in entries:
        state = "complete" if (entry / "report.json").exists() else "incomplete (interrupted training)"
        folders = [p for p in sorted(entry.iterdir()) if (p / "config.json").exists()]
        for i, folder in enumerate(folders or [entry]):
            table.add_row(entry.name if i == 0 else "", state if i == 0 else "", folder.name if folders else "–",
                          str(folder))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
