"""`deepseemoe stats RUN_DIR [--checkpoint CHECKPOINT_RUN]`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def stats(
        run_dir: Path = typer.Argument(..., help="A run directory written by `deepseemoe route`."),
        checkpoint: Path = typer.Option(None, help="Routing run of an earlier checkpoint on the same text "
                                                   "(router saturation)."),
        min_count: int = typer.Option(5, min=1, help="Minimum occurrences of a token for vocabulary specialization."),
        no_figures: bool = typer.Option(False, "--no-figures", help="Skip the PNG figures."),
        trust: bool = typer.Option(False, "--trust", help="Skip checking every file of the run against its manifest "
                                   "first (the files read are checked all the same)."),
    ) -> None:
        """Routing statistics: load, entropy, co-activation, repetition, vocabulary and domain
        specialization, cross-layer paths, router saturation. Written to RUN_DIR/analyses/."""
        import time

        from rich.console import Console
        from rich.table import Table

        from deepseemoe.progress import num, out_console
        from deepseemoe.routing.stats import compute_routing_stats, save_routing_stats

        start = time.perf_counter()
        result = compute_routing_stats(run_dir, checkpoint=checkpoint, min_count=min_count, progress=True,
                                       trust=trust)
        with Console(stderr=True).status("writing tables and figures"):
            out = save_routing_stats(result, figures=not no_figures)
        table = Table(title=f"{result.summary['tokens']:,} tokens · {time.perf_counter() - start:.1f}s")
        for col in ("layer", "load entropy", "CV", "dead", "top-1 repeat (baseline)", "vocab spec.", "domain NMI",
                    "→ next NMI"):
            table.add_column(col)
        for layer, s in result.summary["layers"].items():
            rep = s["repetition"]
            table.add_row(layer, num(s["load_entropy"]), num(s["load_cv"], ".2f"), str(s["dead_experts"]),
                          f"{num(rep['top1_same'])} ({num(rep['top1_same_load_matched'])})",
                          num(s["vocab_specialization_input"]), num(s["domain_nmi"]),
                          num(s.get("transition_to_next", {}).get("nmi")))
        console = out_console()
        console.print(table)
        if "saturation" in result.summary:
            console.print("router saturation against " + str(checkpoint) + ": " + ", ".join(
                f"L{la} top-k {v['topk_saturation']:.3f} (top-1 {v['top1_agreement']:.3f}, random "
                f"{v['random_baseline']:.3f})" for la, v in result.summary["saturation"]["layers"].items()))
        console.print(f"tables and figures in {out}")
