"""`deepseemoe evaluate RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import (
    batch_size_option,
    device_map_option,
    run_device_option,
    trust_remote_code_option,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        data: str = typer.Option(None, help="Held-out text (default: the training data, which is not held out)."),
        tokens: int = typer.Option(20_000, min=1, help="Evaluation tokens."),
        batch_size: int = batch_size_option(),
        device: str = run_device_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """FVU, L0, dead/dense latents, spliced ΔCE / KL / loss recovered, routing preserved, and sparse
        probing of the documents' domains beside a random dictionary's."""
        from deepseemoe.dictionaries.evaluate import evaluate_run
        from deepseemoe.progress import out_console
        from deepseemoe.report import terminal
        from deepseemoe.runs.dictionary import DictionaryRun

        run = DictionaryRun.open(run_dir)
        doc = evaluate_run(run_dir, data=data, tokens=tokens, batch_size=batch_size, device=device, device_map=device_map,
                           trust_remote_code=trust_remote_code)
        terminal.evaluation(doc, out_console())
        path = run.save_evaluation(doc)
        print(f"→ {path} (FVU: {doc['fvu_normalisation']})")
