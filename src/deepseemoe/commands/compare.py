"""`deepseemoe compare MOE_MODEL DENSE_MODEL [--separate MODEL] --data TEXT --out DIR`: is the MoE more
interpretable — and do experts trained separately (FlexOlmo-style) differ from experts trained together?"""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import device_map_option, dtype_option, trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        moe_model: str = typer.Argument(..., help="The MoE model (hub id or folder)."),
        dense_model: str = typer.Argument(..., help="Its dense twin (same data, matched active parameters)."),
        data: str = typer.Option(..., "--data", help="Held-out text with a domain field."),
        out: Path = typer.Option(..., "--out", help="Folder for comparison.json / comparison.md."),
        separate: str = typer.Option(None, "--separate", help="A third model: an MoE whose experts were trained "
                                     "separately (e.g. `deepseemoe zoo train --separate`, or a FlexOlmo)."),
        train_data: str = typer.Option(None, help="Text to train the SAEs on (default: --data)."),
        tokens: int = typer.Option(20_000, min=1, help="Held-out tokens for selectivity and ablations."),
        ctx_len: int = typer.Option(None, min=1, help="Context length (default: 256, or the model's position limit when smaller)."),
        domain_field: str = typer.Option("domain", help="Field holding each document's domain label."),
        sae_layer: int = typer.Option(None, min=0, help="Residual layer of the SAE frontier (default: the middle)."),
        sae_k: str = typer.Option("8,16,32", help="k values of the SAE frontier."),
        sae_tokens: int = typer.Option(200_000, min=0, help="Training tokens per SAE (0: skip the SAEs): the residual "
                                       "frontier of every model, and for each MoE a block-input SAE (the largest k) "
                                       "with its feature ↔ expert map."),
        expansion_factor: int = typer.Option(8, min=1, help="SAE width / model width."),
        max_units: int = typer.Option(64, min=1, help="Units ablated per kind (the most active ones)."),
        device: str = typer.Option(None, help="Device for the models and the frontier's SAEs, e.g. cuda:0."),
        dtype: str = dtype_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Selectivity of experts, neurons and heads; ablation selectivity; the SAE frontier — one table."""
        from deepseemoe.compare.frontier import dictionary_comparison
        from deepseemoe.compare.selectivity import compare_models
        from deepseemoe.data.sources import resolve_files
        from deepseemoe.data.tokens import heldout_batches
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.models.load import load_model
        from deepseemoe.progress import out_console
        from deepseemoe.report.tables import comparison_markdown
        from deepseemoe.runs.study import save_comparison

        if not data.startswith("hf:"):
            resolve_files(data)
        loading = {"dtype": dtype, "device": device, "device_map": device_map, "trust_remote_code": trust_remote_code}
        moe = load_model(moe_model, **loading)
        dense = load_model(dense_model, **loading)
        third = load_model(separate, **loading) if separate else None
        if third is not None and not third.is_moe:  # before the long work
            raise DeepSeeMoEError(f"--separate {separate} has no MoE layers; give the separately trained MoE")

        def batches(h):
            return heldout_batches(h, data, tokens=tokens, ctx_len=ctx_len, domain_field=domain_field)

        layer = moe.num_layers // 2 if sae_layer is None else sae_layer
        handles = [h for h in (moe, dense, third) if h is not None]
        if sae_tokens > 0 and layer >= min(h.num_layers for h in handles):  # checked before the long work
            raise DeepSeeMoEError(f"--sae-layer {layer} does not exist in every model (they have "
                                  f"{', '.join(str(h.num_layers) for h in handles)} layers); choose a smaller one")
        not_moe = [h.name for h in handles if h.is_moe and layer not in h.moe_layers]
        if sae_tokens > 0 and not_moe:
            raise DeepSeeMoEError(f"--sae-layer {layer} is not an MoE layer of {', '.join(not_moe)} (the block-input "
                                  "SAE reads an MoE block there); choose an MoE layer of every MoE model")
        result = compare_models(moe, dense, batches(moe), batches(dense), separate=third,
                                batches_separate=batches(third) if third is not None else None,
                                max_units_per_kind=max_units, progress=True)
        models = {"moe": moe_model, "dense": dense_model, **({"separate": separate} if separate else {})}
        if sae_tokens > 0:
            moes = [label for label, h in zip(models, handles, strict=True) if h.is_moe]
            result.update(dictionary_comparison(models, moes, train_data or data, data, out, layer=layer,
                                                ks=[int(k) for k in sae_k.split(",")],
                                                expansion_factor=expansion_factor, tokens=sae_tokens,
                                                eval_tokens=tokens, ctx_len=ctx_len, **loading))
        result["models"] = {label: h.name for label, h in zip(models, handles, strict=True)}
        md = comparison_markdown(result)
        path = save_comparison(out, result, md)
        out_console().print(md, soft_wrap=True)  # a markdown table: its rows unbroken
        out_console().print(f"[green]→ {path}[/]")
