"""`deepseemoe ternarize MODEL --out DIR`: post-hoc ternary experts / router / MLP (`models/ternary.py`)
and, with --data, the loss it costs per domain."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import (
    batch_size_option,
    device_map_option,
    dtype_option,
    model_device_option,
    trust_remote_code_option,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def ternarize(
        model: str = typer.Argument(..., help="Hub id, local folder, or tiny:MODEL_TYPE."),
        out: Path = typer.Option(..., "--out", help="Folder for the ternary model (a Hugging Face model folder) "
                                 "and ternary.json."),
        parts: str = typer.Option("experts,router,mlp", help="What to ternarise: experts, router, mlp (those the "
                                  "model has)."),
        per: str = typer.Option("tensor", help="Absmean scale per 'tensor' (per expert matrix) or per output 'row'."),
        data: str = typer.Option(None, "--data", help="Held-out text: the loss before and after, per domain."),
        tokens: int = typer.Option(20_000, min=1, help="Held-out tokens."),
        ctx_len: int = typer.Option(None, min=2, help="Context length (default: 256, or the model's position limit when smaller)."),
        batch_size: int = batch_size_option(),
        domain_field: str = typer.Option("domain", help="Field holding each document's domain label."),
        device: str = model_device_option(),
        dtype: str = dtype_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Ternarise a model's experts and router (or a dense model's MLPs) by BitNet's absmean rule: the share
        of zero trits per tensor and, with --data, the loss per domain before and after."""
        from deepseemoe.compare.ternary import ternary_study
        from deepseemoe.data.tokens import heldout_batches
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.models.load import load_model
        from deepseemoe.models.ternary import PARTS, save_ternary_model, ternary_targets
        from deepseemoe.progress import out_console
        from deepseemoe.report import terminal

        wanted = tuple(p for p in parts.split(",") if p)
        if per not in ("tensor", "row"):
            raise DeepSeeMoEError(f"--per {per!r}: give tensor or row")
        if not wanted or any(p not in PARTS for p in wanted):
            raise DeepSeeMoEError(f"--parts {parts!r}: choose from {', '.join(PARTS)}")
        if out.exists() and any(out.iterdir()):
            raise DeepSeeMoEError(f"{out} is not empty; give a new --out folder")
        if data and not data.startswith("hf:"):
            from deepseemoe.data.sources import resolve_files

            resolve_files(data)
        handle = load_model(model, dtype=dtype, device=device, device_map=device_map,
                            trust_remote_code=trust_remote_code)
        # the parts this model has: experts and router in an MoE, mlp where there are dense MLPs
        present = tuple(p for p in wanted if (handle.is_moe if p != "mlp" else bool(handle.dense_mlps)))
        if not present:
            raise DeepSeeMoEError(f"{model} has no tensors of the parts {','.join(wanted)} (experts and router need "
                                  "an MoE, mlp a dense model); choose other --parts")
        ternary_targets(handle, present)
        batches = heldout_batches(handle, data, tokens=tokens, ctx_len=ctx_len, batch_size=batch_size,
                                  domain_field=domain_field) if data else None
        result = ternary_study(handle, present, per, batches)
        save_ternary_model(handle, out, result)
        console = out_console()
        console.print(f"{len(result['tensors'])} tensors ternarised ({', '.join(present)}, scale per {per}); "
                      f"{100 * result['zero_share']:.1f}% of their trits are 0")
        if "loss" in result:
            console.print(terminal.ternary_loss(result))
        console.print(f"[green]→ {out}[/]")
