"""`deepseemoe sweep CONFIG.yaml`."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        config: Path = typer.Argument(..., help="Sweep config (YAML): a run config without coders, plus `sweep:` "
                                                "layers, latents_per_layer, k, neighbours, seeds (kinds, "
                                                "autointerp); see README."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """How many neighbouring layers a cross-layer transcoder should write to: one CLT per reach at equal
        latents and L0, every seed, evaluated on held-out text; one table (mean ± sd) with the elbow."""
        from deepseemoe.compare.sweep import SweepSettings, run_sweep
        from deepseemoe.dictionaries.config import load_yaml_mapping
        from deepseemoe.progress import out_console

        raw = load_yaml_mapping(config)
        if trust_remote_code:
            raw["trust_remote_code"] = True
        settings = SweepSettings.from_dict(raw)
        autointerp = None
        if settings.autointerp:  # the explainer is made (or refused) before anything is trained
            from deepseemoe.explain.backends import chat_backend
            from deepseemoe.explain.sweep import seed_scorer

            ai = settings.autointerp
            backend = chat_backend(ai["backend"], ai.get("url"), ai.get("model"), ai.get("api_key_env"),
                                   trust_remote_code=trust_remote_code)
            judge = chat_backend(ai["judge"], ai.get("url"), ai.get("model"), ai.get("api_key_env"),
                                 trust_remote_code=trust_remote_code) if ai.get("judge") else None
            autointerp = seed_scorer(settings, backend, judge, trust_remote_code=trust_remote_code)
        c = out_console()
        result = run_sweep(settings, trust_remote_code=trust_remote_code, echo=c.print, autointerp=autointerp)
        if result.reused:
            c.print(f"reused the finished seed(s) {result.reused}")
        print(result.run.table_markdown())
        c.print(f"[green]→ {result.run.path}[/]")
