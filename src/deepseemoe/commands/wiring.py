"""`deepseemoe wiring MODEL [MODEL …] --out DIR`: modules of the feed-forward neurons' weight graph."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def wiring(
        models: list[str] = typer.Argument(..., help="Models to compare (hub ids or local folders), e.g. an MoE, "
                                           "its dense twin and their ternary versions."),
        out: Path = typer.Option(..., "--out", help="Folder for wiring.json."),
        fan_in: int = typer.Option(8, "--fan-in", min=1, help="Edges kept per neuron: the strongest |w| into each reader and out of each writer."),
        draws: int = typer.Option(5, min=2, help="Rewirings within each pair of consecutive layers (degrees kept) "
                                  "for the modularity z-score."),
        seed: int = typer.Option(0, min=0, help="Seed of Louvain and of the rewirings."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Louvain modules of the neuron graph (virtual weights between consecutive feed-forward layers), their
        modularity against rewirings within each pair of consecutive layers (z), NMI with the layers, and for an
        MoE their NMI with the experts against expert labels shuffled within each layer (excess, z)."""
        from rich.table import Table

        from deepseemoe.compare.wiring import wiring_modules
        from deepseemoe.models.load import load_model
        from deepseemoe.progress import out_console, track
        from deepseemoe.runs.atomic import atomic_write_json
        from deepseemoe.runs.study import WIRING as WIRING_JSON

        rows = []
        for name in track(models, "wiring", unit="models"):
            rows.append(wiring_modules(load_model(name, trust_remote_code=trust_remote_code), fan_in=fan_in,
                                       draws=draws, seed=seed))
        result = {"fan_in": fan_in, "draws": draws, "seed": seed, "models": rows}
        atomic_write_json(out / WIRING_JSON, result)
        table = Table(title=f"Modules of the feed-forward wiring ({fan_in} strongest edges in and out of each neuron; "
                      "null: rewired within each pair of consecutive layers)")
        for c in ("model", "kind", "neurons", "edges", "modules", "Q", "Q null", "z", "NMI(layer)", "NMI(expert)",
                  "shuffled", "excess", "z(NMI)"):
            table.add_column(c, justify="right")
        for r in rows:
            moe = "nmi_expert" in r
            table.add_row(r["model"][-40:], r["kind"], f"{r['neurons']:,}", f"{r['edges']:,}", str(r["modules"]),
                          f"{r['modularity']:.3f}", f"{r['rewired_modularity']:.3f}", f"{r['z']:.1f}",
                          f"{r['nmi_layer']:.3f}",
                          *((f"{r['nmi_expert']:.3f}", f"{r['nmi_expert_null']:.3f}", f"{r['nmi_expert_excess']:+.3f}",
                             f"{r['nmi_expert_z']:.1f}") if moe else ("–",) * 4))
        out_console().print(table)
        out_console().print(f"[green]→ {out / WIRING_JSON}[/]")
