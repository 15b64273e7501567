"""`deepseemoe ternarize MODEL --out DIR`: post-hoc ternary experts / router / MLP (`models/ternary.py`)
and, with --data, the loss it costs per domain."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import device_map_option, dtype_option, trust_remote_code_option


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
        batch_size: int = typer.Option(8, min=1, help="Contexts per forward pass."),
        domain_field: str = typer.Option("domain", help="Field holding each document's domain label."),
        device: str = typer.Option(None, help="Device for the model."),
        dtype: str = dtype_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Ternarise a model's experts and router (or a dense model's MLPs) by BitNet's absmean rule: the share
        of zero trits per tensor and, with --data, the loss per domain before and after."""
        from rich.table import Table

        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.models.load import load_model
        from deepseemoe.models.ternary import PARTS, ternarize_model, ternary_record, ternary_targets
        from deepseemoe.progress import out_console

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
        meter = None
        if data:
            from deepseemoe.causal.checks import LossMeter, token_domains
            from deepseemoe.data.sources import TextSource, iter_documents
            from deepseemoe.data.tokens import pack_documents

            batches = list(pack_documents(handle.require_tokenizer(),
                                          iter_documents(TextSource(data, domain_field=domain_field)),
                                          ctx_len=handle.check_ctx_len(ctx_len), batch_size=batch_size,
                                          max_tokens=tokens))
            meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
        tensors = ternarize_model(handle, present, per)
        result = {"model": handle.name, **ternary_record(present, per, tensors)}
        if meter is not None:
            result["loss"] = loss_before_after(meter)
        save_model_folder(handle, out, result)
        console = out_console()
        console.print(f"{len(tensors)} tensors ternarised ({', '.join(present)}, scale per {per}); "
                      f"{100 * result['zero_share']:.1f}% of their trits are 0")
        if "loss" in result:
            table = Table(title="held-out loss, nats/token")
            for c in ("domain", "float", "ternary", "Δ"):
                table.add_column(c, justify="right")
            for d, r in result["loss"].items():
                table.add_row(d, f"{r['float']:.4f}", f"{r['ternary']:.4f}", f"{r['ternary'] - r['float']:+.4f}")
            console.print(table)
        console.print(f"[green]→ {out}[/]")


def save_model_folder(handle, out: Path, result: dict) -> None:
    """The model, its tokenizer and ternary.json, built beside `out` and swapped in whole, so an
    interrupted run leaves no half-written model folder."""
    from deepseemoe.models.ternary import TERNARY_JSON
    from deepseemoe.runs.atomic import atomic_write_json
    from deepseemoe.runs.lock import atomic_dir

    def write(tmp: Path) -> None:
        handle.model.save_pretrained(tmp)
        if handle.tokenizer is not None:
            handle.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TERNARY_JSON, result)

    atomic_dir(out, write)


def loss_before_after(meter) -> dict[str, dict[str, float]]:
    """Per domain and over all ('all'): the clean loss `meter` measured and the loss of the model now."""
    after = meter.measure()
    clean = meter.clean_loss()
    out = {d: {"float": clean["by_domain"][d], "ternary": clean["by_domain"][d] + after["by_domain"][d],
               "predictions": clean["predictions"][d]} for d in sorted(after["by_domain"])}
    if out:
        out["all"] = {"float": clean["ce"], "ternary": clean["ce"] + after["delta_ce"],
                      "predictions": sum(v["predictions"] for v in out.values())}
    return out
