"""`deepseemoe evaluate RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        data: str = typer.Option(None, help="Held-out text (default: the training data, which is not held out)."),
        tokens: int = typer.Option(20_000, min=1, help="Evaluation tokens."),
        batch_size: int = typer.Option(8, min=1, help="Contexts per forward pass."),
        device: str = typer.Option(None, help="Device for the model and coders (default: the run's)."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """FVU, L0, dead/dense latents, spliced ΔCE / KL / loss recovered, routing preserved."""
        from rich.console import Console
        from rich.table import Table

        from deepseemoe.dictionaries.evaluate import evaluate_run
        from deepseemoe.runs.dictionary import DictionaryRun

        run = DictionaryRun.open(run_dir)
        doc = evaluate_run(run_dir, data=data, tokens=tokens, batch_size=batch_size, device=device,
                           trust_remote_code=trust_remote_code)
        table = Table(title=f"{doc['tokens']:,} tokens of {doc['data']}")
        cols = ["fvu", "l0", "dead", "dense", "delta_ce", "kl", "loss_recovered", "routing_preserved"]
        heads = ["FVU", "L0", "dead", "dense", "ΔCE", "KL", "recovered", "routing"]
        table.add_column("coder", no_wrap=True)
        for h in heads:
            table.add_column(h, justify="right", no_wrap=True)
        for name, r in doc["coders"].items():
            table.add_row(name, *[(f"{r[c]:.1f}" if c == "l0" else f"{r[c]:.3f}") if c in r else "—" for c in cols])
        console = Console()
        console.print(table)
        console.print(f"[green]→ {run.save_evaluation(doc)}[/] (FVU: {doc['fvu_normalisation']})")
