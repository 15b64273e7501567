"""`deepseemoe corpus build`: the offline multi-domain corpus."""

from __future__ import annotations

from pathlib import Path

import typer

corpus_app = typer.Typer(help="The offline demo corpus.", no_args_is_help=True)


@corpus_app.command("build")
def build(
    out: Path = typer.Option(Path("runs/corpus"), "--out", help="Folder for train.jsonl, val.jsonl, report.json."),
    seed: int = typer.Option(0, min=0, help="Seed of the sampling and the split."),
    max_mb_per_domain: float = typer.Option(2.5, help="Text per domain, in MB."),
) -> None:
    """Collect labelled documents (code, en, de, es, ru, data) from text present on this machine."""
    from rich.table import Table

    from deepseemoe.data.demo_corpus import build_corpus
    from deepseemoe.progress import out_console

    report = build_corpus(out, seed=seed, max_bytes_per_domain=int(max_mb_per_domain * 1e6), progress=True)
    table = Table(title=f"corpus → {out}")
    for col in ("domain", "train docs", "val docs", "MB", "sources"):
        table.add_column(col)
    for domain, d in report.domains.items():
        table.add_row(domain, str(d["train_docs"]), str(d["val_docs"]), f"{d['bytes'] / 1e6:.2f}",
                      ", ".join(d["sources"]))
    console = out_console()
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")


def register(app: typer.Typer) -> None:
    app.add_typer(corpus_app, name="corpus")
