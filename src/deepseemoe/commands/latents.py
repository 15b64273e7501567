"""`deepseemoe latents RUN_DIR`: latent activations of trained dictionaries → delphi's latent cache."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import (
    batch_size_option,
    device_map_option,
    dictionary_name,
    run_device_option,
    trust_remote_code_option,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def latents(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        dictionary: list[str] = typer.Option(None, "--dictionary", help="Coder name(s) (default: all)."),
        data: str = typer.Option(None, help="Text to run (default: the run's data)."),
        tokens: int = typer.Option(100_000, min=1, help="Tokens to cache."),
        batch_size: int = batch_size_option(),
        n_splits: int = typer.Option(5, min=1, help="Latent ranges per file, as delphi reads them."),
        device: str = run_device_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Cache where every latent fires (delphi format: RUN_DIR/latents/NAME/)."""
        from deepseemoe.dictionaries.latent_cache import collect_latents, save_delphi_cache
        from deepseemoe.dictionaries.trained import TrainedRun
        from deepseemoe.progress import out_console

        trained = TrainedRun.open(run_dir, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
        run, spec = trained.run, trained.spec
        names = [dictionary_name(run_dir, n) for n in dictionary] if dictionary else run.coder_names()
        handle = trained.model()
        batches = trained.batches(data=data, batch_size=batch_size, tokens=tokens)
        console = out_console()
        for name in names:
            coder, record = trained.coder(name)
            got = collect_latents(handle, coder, list(record.sources), batches, progress=True,
                                  description=f"latents {name}")
            config = {"dataset_repo": data or spec.data, "dataset_split": "", "dataset_name": "",
                      "dataset_column": spec.field, "batch_size": batch_size, "cache_ctx_len": spec.ctx_len,
                      "n_tokens": int(sum(b.num_tokens for b in batches)), "model_name": handle.name}
            out = save_delphi_cache(run.latents_dir(name), got, coder.cfg.n_latents, n_splits=n_splits,
                                    config=config)
            console.print(f"[green]{name}[/]: {len(got['activations']):,} activations over "
                          f"{got['tokens'].numel():,} positions → {out}")
