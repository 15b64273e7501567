"""`deepseemoe report RUN_DIR [CHECKPOINT_RUN...]`: the static report of a study, from its files."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run_dir: Path = typer.Argument(..., help="A study folder (e.g. runs/demo) or the routing run in it (after "
                                     "`deepseemoe stats`)."),
        checkpoint_runs: list[Path] = typer.Argument(None, help="Routing runs of earlier checkpoints on the same "
                                                                 "text (default: STUDY/checkpoints/*)."),
        out: Path = typer.Option(None, "--out", help="The HTML file (default: STUDY/report/index.html)."),
        title: str = typer.Option(None, help="The report's title (default: the model)."),
        trust: bool = typer.Option(False, "--trust", help="Skip checking every file of the run against its manifest "
                                   "first (the files read are checked all the same)."),
    ) -> None:
        """One HTML page from run directories alone: the routing statistics of RUN_DIR and whatever
        dictionaries, maps, ablations and comparisons sit beside it (its parent is the study)."""
        from deepseemoe.progress import out_console
        from deepseemoe.report.html import build_report

        path = build_report(run_dir, out, checkpoint_runs=checkpoint_runs or None, title=title, trust=trust)
        out_console().print(f"[green]→ {path}[/]")
