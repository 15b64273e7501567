"""`deepseemoe verify RUN_DIR`: check every file of a run against its manifest."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def verify(
        run_dir: Path = typer.Argument(..., help="A run directory written by `deepseemoe route`."),
    ) -> None:
        """Check the sha256 of every file the run's manifest lists (and of its analyses)."""
        import time

        from deepseemoe.progress import out_console
        from deepseemoe.runs.routing import RoutingRun

        start = time.perf_counter()
        run = RoutingRun.open(run_dir)
        n, size = run.verify_all()
        extra = ""
        if run.has_analyses:
            run.analyses()
            extra = " and its analyses"
        out_console().print(f"[green]{run.run_dir}: {n} files ({size / 1e6:,.1f} MB){extra} match the manifest[/] "
                        f"({time.perf_counter() - start:.1f}s)")
