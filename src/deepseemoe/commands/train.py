"""`deepseemoe train CONFIG.yaml` (or one coder from flags)."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import device_map_option, dtype_option, trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path = typer.Argument(None, help="Run config (YAML); see README: Dictionaries. Flags override it."),
        model: str = typer.Option(None, help="Hub id, local folder, or tiny:MODEL_TYPE."),
        data: str = typer.Option(None, help="The text: local file/folder/glob or hf:DATASET."),
        out: Path = typer.Option(None, help="Run folder for the dictionaries, metrics and checkpoint."),
        kind: str = typer.Option("transcoder", help="Without a config: sae, transcoder, skip_transcoder, "
                                                    "router_transcoder, crosscoder or clt."),
        layers: str = typer.Option(None, help="Without a config: layer(s), e.g. 3 or 0,1,2 or all."),
        site: str = typer.Option("resid_out", help="Without a config: the site of an sae / crosscoder."),
        activation: str = typer.Option("topk", help="Without a config: topk, batchtopk, jumprelu or relu."),
        k: int = typer.Option(32, min=1, help="Without a config: active latents per token (TopK / BatchTopK)."),
        expansion_factor: int = typer.Option(16, min=1, help="Without a config: latents per input dimension."),
        ternary: str = typer.Option("", help="Without a config: ternary weights (BitNet absmean, one scale per "
                                    "latent, trained straight-through): encoder, decoder or both."),
        tokens: int = typer.Option(None, min=1, help="Training tokens."),
        ctx_len: int = typer.Option(None, "--ctx-len", min=2, help="Context length of the model's forward passes (default: 256, or the "
                                     "model's position limit when smaller)."),
        dtype: str = dtype_option(),
        device_map: str = device_map_option(),
        model_device: str = typer.Option(None, help="Device of the model, e.g. cuda:0."),
        coder_device: str = typer.Option(None, help="Device of the coders and their buffer, e.g. cuda:1."),
        formats: list[str] = typer.Option(None, "--format", help="Also write saelens, sparsify or circuit_tracer "
                                                                "files (repeatable)."),
        resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Train sparse dictionaries (SAEs, transcoders, router transcoders, crosscoders, CLTs)."""
        import os

        from deepseemoe.dictionaries.config import RunSpec, load_yaml_mapping
        from deepseemoe.dictionaries.training import train_run
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.progress import out_console

        if config is not None:
            raw = load_yaml_mapping(config)
        else:
            if not layers:
                raise DeepSeeMoEError("pass a run config, or --layers (with --model, --data, --out) for one coder")
            ls = "all" if layers == "all" else [int(v) for v in layers.split(",")]
            raw = {"coders": [{"kind": kind, "layers": ls, "site": site, "activation": activation, "k": k,
                               "expansion_factor": expansion_factor, "ternary": ternary}]}
        overrides = {"model": model, "data": data, "out": str(out) if out else None, "tokens": tokens,
                     "model_device": model_device, "coder_device": coder_device, "formats": formats or None,
                     "ctx_len": ctx_len, "dtype": dtype, "device_map": device_map}
        raw.update({key: v for key, v in overrides.items() if v is not None})
        if trust_remote_code:  # recorded in the saved config; granted only by this flag (load_for_run)
            raw["trust_remote_code"] = True
        spec = RunSpec.from_dict(raw)
        result = train_run(spec, resume=resume, trust_remote_code=trust_remote_code)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the summary is printed once, by rank 0
            return
        console = out_console()
        for name, m in result.final.items():
            console.print(f"  {name}: FVU {m['fvu']:.3f} · L0 {m['l0']:.1f} · dead {m['dead']:.1%}")
        if result.exhausted:
            console.print(f"[yellow]the corpus ran out after {result.tokens:,} of {spec.tokens:,} tokens[/]")
        console.print(f"[green]trained {len(result.final)} coder(s) on {result.tokens:,} tokens in "
                      f"{result.seconds:.1f}s ({result.tokens / max(result.seconds, 1e-9):,.0f} tok/s) → "
                      f"{result.out}/dictionaries[/]")
