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


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
