"""`deepseemoe steer RUN_DIR --dictionary NAME --feature F [--scale S]`: ablate or steer one feature."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def steer(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        dictionary: str = typer.Option(..., "--dictionary", help="A single-site SAE of the run."),
        feature: list[int] = typer.Option(..., "--feature", help="Feature index (repeatable)."),
        scale: float = typer.Option(0.0, help="Multiply the feature's contribution: 0 ablates, 2 doubles."),
        corpus: str = typer.Option(None, help="Held-out text (default: the run's corpus)."),
        tokens: int = typer.Option(4_000, help="Tokens to measure on."),
        batch_size: int = typer.Option(8, help="Contexts per forward pass."),
    ) -> None:
        """ΔCE, KL and how often the chosen experts change when a feature is ablated or steered."""
        import yaml
        from rich.console import Console

        from deepseemoe.analysis.steering import edit_feature
        from deepseemoe.capture.core import Site
        from deepseemoe.data.sources import TextSource, iter_documents
        from deepseemoe.data.tokens import pack_documents
        from deepseemoe.dictionaries.formats import load_native
        from deepseemoe.dictionaries.run import load_for_run
        from deepseemoe.dictionaries.spec import RunSpec
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.routing.store import atomic_write_json

        if not (run_dir / "config.yaml").exists():
            raise DeepSeeMoEError(f"{run_dir} is not a training run (no config.yaml); pass the --out of `deepseemoe train`")
        if not (run_dir / "dictionaries" / dictionary).exists():
            raise DeepSeeMoEError(f"no dictionary {dictionary!r} in {run_dir}/dictionaries")
        spec = RunSpec.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        coder, meta = load_native(run_dir / "dictionaries" / dictionary, device=spec.coder_device or "cpu")
        handle = load_for_run(spec, spec.model_device)
        source = TextSource(corpus or spec.corpus, field=spec.field, domain_field=spec.domain_field)
        batches = list(pack_documents(handle.tokenizer, iter_documents(source), ctx_len=spec.ctx_len,
                                      batch_size=batch_size, max_tokens=tokens))
        site = Site(*meta["source"][0])
        results = [edit_feature(handle, coder, site, batches, f, scale) for f in feature]
        console = Console()
        for r in results:
            routing = ", ".join(f"L{la} {v['all_tokens']:.3f} ({v['where_fired']:.3f} where fired)"
                                for la, v in r["routing_changed"].items())
            console.print(f"feature {r['feature']} × {scale}: fired on {r['fired_tokens']} tokens · ΔCE "
                          f"{r['delta_ce']:.4f} · KL {r['kl']:.4f} · experts changed: {routing or '—'}")
        out = run_dir / "steering" / f"{dictionary}.json"
        atomic_write_json(out, results)
        console.print(f"[green]→ {out}[/]")
