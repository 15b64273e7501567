"""`deepseemoe zoo train`: the demo's MoE and dense twin."""

from __future__ import annotations

from pathlib import Path

import typer

zoo_app = typer.Typer(help="The small models the project trains itself.", no_args_is_help=True)


@zoo_app.command("train")
def train(
    data: Path = typer.Option(Path("runs/corpus"), "--data", help="A folder made by `deepseemoe corpus build`."),
    recipe: str = typer.Option("demo", help="demo (CPU, minutes), tiny (seconds), gpu."),
    cache_dir: Path = typer.Option(None, help="Model cache (default ~/.cache/deepseemoe or $DEEPSEEMOE_CACHE)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train again even if cached."),
) -> None:
    """Train (or reuse) the tokenizer, the OLMoE model and its dense twin; print losses per domain."""
    from rich.console import Console
    from rich.table import Table

    from deepseemoe.zoo.train import train_zoo

    zoo = train_zoo(data, recipe=recipe, cache_dir=cache_dir, retrain=retrain)
    r = zoo.report
    table = Table(title=f"validation loss, nats/token ({'cached' if zoo.cached else 'trained'}: {zoo.root})")
    for col in ("domain", "MoE", "dense twin", "unigram"):
        table.add_column(col)
    for d in sorted(r["val_loss"]["moe"]):
        table.add_row(d, f"{r['val_loss']['moe'][d]:.3f}", f"{r['val_loss']['dense'][d]:.3f}",
                      f"{r['unigram_baseline'][d]:.3f}")
    Console().print(table)
    Console().print(f"MoE: {zoo.moe_dir}\ndense: {zoo.dense_dir}")


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
