"""`deepseemoe inspect MODEL`: the model's MoE structure in a table."""

from __future__ import annotations

import typer

from deepseemoe.commands._options import trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        model: str = typer.Argument(..., help="Hub id or local folder; or tiny:MODEL_TYPE for a tiny random model."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Print layers, experts, top-k, router family, shared experts and dense layers (from the config
        alone: no weights are read)."""
        from rich.table import Table

        from deepseemoe.models.structure import (
            COLUMNS,
            cache_key,
            cached_structure,
            save_structure,
            structure_of,
        )
        from deepseemoe.progress import out_console

        key = cache_key(model, trust_remote_code)
        structure = cached_structure(model, key) if key else None
        if structure is None:
            from deepseemoe.models.load import load_model

            # the structure only: built from the config on the meta device, no weight is read
            handle = load_model(model, trust_remote_code=trust_remote_code, load_tokenizer=False, weights=False)
            structure = structure_of(handle)
            if key:
                save_structure(key, structure)
        table = Table(title=structure.title)
        for col in COLUMNS:
            table.add_column(col)
        for row in structure.rows:
            table.add_row(*row)
        out_console().print(table)
