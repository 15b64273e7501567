"""`deepseemoe map RUN_DIR --dictionary NAME`: features ↔ experts of the MoE layer the dictionary feeds."""

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
    @app.command(name="map")
    def map_features(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        dictionary: str = typer.Option(..., "--dictionary", help="Name of the trained coder."),
        data: str = typer.Option(None, help="Held-out text (default: the run's data)."),
        tokens: int = typer.Option(20_000, min=1, help="Tokens to map on (half fit the routing predictors, half test)."),
        layer: int = typer.Option(None, min=0, help="MoE layer to relate to (default: the one the coder's source feeds)."),
        batch_size: int = batch_size_option(),
        examples: int = typer.Option(5, min=1, help="Top-activating examples per feature."),
        device: str = run_device_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Expert distribution, lift and MI per feature; routing prediction vs token/bigram baselines;
        exact router-logit attribution for SAEs on the block input; top examples with their routing."""
        from deepseemoe.dictionaries.trained import TrainedRun
        from deepseemoe.features.map import compute_map
        from deepseemoe.progress import out_console

        trained = TrainedRun.open(run_dir, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
        dictionary = dictionary_name(run_dir, dictionary)
        result = compute_map(trained, dictionary, data=data, tokens=tokens, layer=layer, batch_size=batch_size,
                             n_examples=examples, progress=True)
        out = trained.run.save_map(dictionary, result.tables, result.examples, result.summary)
        summary = result.summary
        c = out_console()
        rp = summary["routing_prediction"]
        c.print(f"layer {summary['layer']}: {summary['live_features']:,} live features · median specificity "
                f"{summary['specificity_median']:.2f} · routing recall@{summary['top_k']}: features {rp['features']:.3f}"
                f" · token {rp['token']:.3f} · bigram {rp['bigram']:.3f} · load only {rp['load_only']:.3f}")
        if "attribution" in summary:
            a = summary["attribution"]
            c.print(f"router attribution: parts add back to the logits within {a['max_abs_error']:.2e} "
                    f"(logit scale {a['logit_scale']:.2f}); error term share {a['error_share']:.3f}")
        c.print(f"[green]→ {out}[/]")
