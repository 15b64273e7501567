"""`deepseemoe steer RUN_DIR --dictionary NAME --feature F [--scale S]`: ablate or steer one feature."""

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
    def steer(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        dictionary: str = typer.Option(..., "--dictionary", help="A single-site SAE of the run."),
        feature: list[int] = typer.Option(..., "--feature", help="Feature index (repeatable)."),
        scale: float = typer.Option(0.0, help="Multiply the feature's contribution: 0 ablates, 2 doubles."),
        data: str = typer.Option(None, help="Held-out text (default: the run's data)."),
        tokens: int = typer.Option(4_000, min=1, help="Tokens to measure on."),
        batch_size: int = batch_size_option(),
        device: str = run_device_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """ΔCE, KL and how often the chosen experts change when a feature is ablated or steered."""
        from deepseemoe.causal.steering import edit_feature
        from deepseemoe.dictionaries.trained import TrainedRun
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.progress import out_console

        trained = TrainedRun.open(run_dir, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
        dictionary = dictionary_name(run_dir, dictionary)
        coder, record = trained.coder(dictionary)
        bad = [f for f in feature if not 0 <= f < coder.cfg.n_latents]
        if bad:
            raise DeepSeeMoEError(f"features {bad} do not exist in {dictionary} ({coder.cfg.n_latents} features: "
                                  f"0–{coder.cfg.n_latents - 1})")
        handle = trained.model()
        batches = trained.batches(data=data, batch_size=batch_size, tokens=tokens)
        site = record.sources[0]
        results = [edit_feature(handle, coder, site, batches, f, scale, progress=True) for f in feature]
        console = out_console()
        for r in results:
            routing = ", ".join(f"L{la} {v['all_tokens']:.3f} ({v['where_fired']:.3f} where fired)"
                                for la, v in r["routing_changed"].items())
            console.print(f"feature {r['feature']} × {scale}: fired on {r['fired_tokens']} tokens · ΔCE "
                          f"{r['delta_ce']:.4f} · KL {r['kl']:.4f} · experts changed: {routing or '—'}")
        out = trained.run.save_steering(dictionary, list(feature), scale, results)
        console.print(f"[green]→ {out}[/]")
