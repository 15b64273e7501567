"""`deepseemoe latents RUN_DIR`: latent activations of trained dictionaries → delphi's latent cache."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def latents(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        dictionary: list[str] = typer.Option(None, "--dictionary", help="Coder name(s) (default: all)."),
        corpus: str = typer.Option(None, help="Text to run (default: the run's corpus)."),
        tokens: int = typer.Option(100_000, help="Tokens to cache."),
        batch_size: int = typer.Option(8, help="Contexts per forward pass."),
        n_splits: int = typer.Option(5, help="Latent ranges per file, as delphi reads them."),
    ) -> None:
        """Cache where every latent fires (delphi format: RUN_DIR/latents/NAME/)."""
        import yaml
        from rich.console import Console

        from deepseemoe.capture.core import Site
        from deepseemoe.data.sources import TextSource, iter_documents
        from deepseemoe.data.tokens import pack_documents
        from deepseemoe.dictionaries.formats import load_native
        from deepseemoe.dictionaries.latent_cache import collect_latents, save_delphi_cache
        from deepseemoe.dictionaries.run import load_for_run
        from deepseemoe.dictionaries.spec import RunSpec
        from deepseemoe.errors import DeepSeeMoEError

        if not (run_dir / "config.yaml").exists():
            raise DeepSeeMoEError(f"{run_dir} is not a training run (no config.yaml); pass the --out of `deepseemoe train`")
        spec = RunSpec.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        names = dictionary or sorted(p.name for p in (run_dir / "dictionaries").glob("*"))
        handle = load_for_run(spec, spec.model_device)
        source = TextSource(corpus or spec.corpus, field=spec.field, domain_field=spec.domain_field)
        batches = list(pack_documents(handle.tokenizer, iter_documents(source), ctx_len=spec.ctx_len,
                                      batch_size=batch_size, max_tokens=tokens))
        console = Console()
        for name in names:
            if not (run_dir / "dictionaries" / name).exists():
                raise DeepSeeMoEError(f"no dictionary {name!r} in {run_dir}/dictionaries; choose from "
                                      f"{sorted(p.name for p in (run_dir / 'dictionaries').glob('*'))}")
            coder, meta = load_native(run_dir / "dictionaries" / name, device=spec.coder_device or "cpu")
            got = collect_latents(handle, coder, [Site(k, la) for k, la in meta["source"]], batches)
            config = {"dataset_repo": corpus or spec.corpus, "dataset_split": "", "dataset_name": "",
                      "dataset_column": spec.field, "batch_size": batch_size, "cache_ctx_len": spec.ctx_len,
                      "n_tokens": int(sum(b.num_tokens for b in batches)), "model_name": handle.name}
            out = save_delphi_cache(run_dir / "latents" / name, got, coder.cfg.n_latents, n_splits=n_splits,
                                    config=config)
            console.print(f"[green]{name}[/]: {len(got['activations']):,} activations over "
                          f"{got['tokens'].numel():,} positions → {out}")
