"""`deepseemoe demo`: the offline default, end to end."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the run, analyses and report go."),
        recipe: str = typer.Option("demo", help="Model recipe: demo (CPU, minutes), tiny (seconds), gpu."),
        retrain: bool = typer.Option(False, "--retrain", help="Train the models again even if cached."),
        cache_dir: Path = typer.Option(None, help="Model cache (default ~/.cache/deepseemoe or $DEEPSEEMOE_CACHE)."),
        max_tokens: int = typer.Option(60_000, min=1, help="Held-out tokens to route and analyse."),
        separate: bool = typer.Option(False, "--separate", help="Also train (once, cached) an MoE whose experts are "
                                      "trained separately, FlexOlmo-style, and compare it (about 5 more minutes)."),
    ) -> None:
        """Build a corpus from text on this machine, train a small MoE and its dense twin (once), and run
        routing capture, routing statistics and the report on them."""
        import time

        from rich.table import Table

        from deepseemoe.demo import run_demo
        from deepseemoe.progress import out_console

        console = out_console()
        start = time.perf_counter()
        result = run_demo(out, recipe=recipe, retrain=retrain, cache_dir=cache_dir, max_tokens=max_tokens,
                          console=console, separate=separate)
        table = Table(title=f"demo done in {time.perf_counter() - start:.0f}s")
        for col in ("layer", "load entropy", "dead", "domain NMI", "top-1 repeat (load-matched)"):
            table.add_column(col)
        for layer, s in result.summary["layers"].items():
            rep = s["repetition"]
            table.add_row(layer, f"{s['load_entropy']:.3f}", str(s["dead_experts"]), f"{s['domain_nmi']:.3f}",
                          f"{rep['top1_same']:.3f} ({rep['top1_same_load_matched']:.3f})")
        console.print(table)
        console.print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
        console.print(f"[bold green]report:[/] {result.report.resolve()}")
