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

        from deepseemoe.models.load import load_model
        from deepseemoe.progress import out_console

        # the structure only: built from the config on the meta device, no weight is read
        handle = load_model(model, trust_remote_code=trust_remote_code, load_tokenizer=False, weights=False)
        table = Table(title=f"{handle.name} ({handle.model_type}): {handle.num_layers} layers, "
                            f"{'MoE' if handle.is_moe else 'dense'}")
        for col in ("layer", "kind", "experts", "top-k", "router family", "combine", "shared", "notes"):
            table.add_column(col)
        for i in range(handle.num_layers):
            moe = handle.moe_layers.get(i)
            if moe is not None:
                table.add_row(str(i), "MoE", str(moe.num_experts), str(moe.top_k), moe.router_family, moe.combine,
                              ", ".join(moe.shared_paths) or "-", "; ".join(moe.notes) or "")
            elif i in handle.dense_mlps:
                table.add_row(str(i), "dense MLP", f"{handle.dense_mlps[i].num_neurons} neurons", "-", "-", "-", "-", "")
            else:
                table.add_row(str(i), "other", "-", "-", "-", "-", "-", "")
        out_console().print(table)
