"""`deepseemoe post-train MODEL --data TRAIN --eval EVAL --out DIR`: LoRA post-training of an MoE, strategy
by strategy (features as hints among them), and what each did to loss and routing (deepseemoe.posttrain)."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import device_map_option, dtype_option, trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command(name="post-train")
    def post_train(
        model: str = typer.Argument(..., help="The MoE to post-train: a local folder or a hub id."),
        data: str = typer.Option(..., "--data", help="The target text to train on (a file, folder or glob of .jsonl, "
                                                     ".parquet, .txt; or hf:DATASET)."),
        eval_data: str = typer.Option(..., "--eval", help="Held-out text of several domains, the target's among them: "
                                                          "gain on the target, forgetting on the others."),
        out: Path = typer.Option(..., "--out", help="The run folder (a killed run reruns only its missing points)."),
        strategy: list[str] = typer.Option(None, "--strategy",
                                           help="all, frozen-router, router-only, experts-by-hint, router-by-hint, "
                                                "random-experts (repeatable or comma-separated; default: the first three, "
                                                "all six with --hint)."),
        target_domain: str = typer.Option(None, "--target-domain",
                                          help="The domain of --eval that is the target (and of --data, when it holds "
                                               "several); default: the one domain of --data."),
        hint: str = typer.Option(None, "--hint", help="RUN_DIR:DICTIONARY — a dictionary trained on MODEL, with its "
                                                      "`map`, whose features choose the experts and the routing target."),
        dense: str = typer.Option(None, "--dense", help="The dense twin, post-trained with `all` at the MoE's budget."),
        dense_rank: int = typer.Option(None, "--dense-rank", min=1,
                                       help="The dense twin's LoRA rank (default: the rank whose trainable parameters "
                                            "are nearest the MoE's `all`; alpha/rank stays the MoE's)."),
        seeds: int = typer.Option(3, min=1, help="Seeds per strategy (the table shows mean ± sd)."),
        steps: int = typer.Option(40, min=1, help="Optimizer steps per point."),
        rank: int = typer.Option(4, min=1, help="LoRA rank (per expert on fused expert tensors)."),
        alpha: float = typer.Option(8.0, min=0.0, help="LoRA alpha (scaling alpha / rank)."),
        lr: float = typer.Option(2e-3, min=0.0, help="Peak learning rate."),
        batch_size: int = typer.Option(8, min=1, help="Contexts per step."),
        ctx_len: int = typer.Option(None, min=2, help="Tokens per context (default: 256 or the model's limit)."),
        train_tokens: int = typer.Option(50_000, min=1, help="Target-text tokens to train on."),
        eval_tokens: int = typer.Option(20_000, min=1, help="Held-out tokens to measure on."),
        hint_features: int = typer.Option(8, min=1, help="Hint features: the target text's most distinctive."),
        experts: float = typer.Option(2.0, help="Hinted experts: a count ≥ 1, or a share of the layer's experts."),
        router_weight: float = typer.Option(1.0, min=0.0, help="router-by-hint: weight of the pull toward the "
                                                               "hinted experts."),
        hold_weight: float = typer.Option(1.0, min=0.0, help="router-by-hint: weight of the KL that holds every "
                                                             "other token's routing."),
        field: str = typer.Option("text", help="Text field of the documents."),
        domain_field: str = typer.Option("domain", help="Domain field of the documents."),
        keep_adapters: bool = typer.Option(False, "--keep-adapters", help="Save PEFT's adapter folders instead of "
                                                                          "merged models."),
        log: list[str] = typer.Option(None, "--log", help="Also log each step to wandb, tensorboard or trackio."),
        dtype: str = dtype_option(),
        device: str = typer.Option(None, help="Device, e.g. cuda:0 (default: CPU, or CUDA when there is one)."),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Fine-tune an MoE with LoRA (PEFT) under several strategies and seeds; per strategy, the gain on the target,
        forgetting on the other domains, routing drift per layer, whether the hint held, and the dense twin's row."""
        from deepseemoe.posttrain.lora import HINTED, STRATEGIES
        from deepseemoe.posttrain.study import PostTrainSettings, post_train
        from deepseemoe.progress import out_console

        chosen = [s.strip() for item in (strategy or []) for s in item.split(",") if s.strip()]
        if not chosen:
            chosen = list(STRATEGIES) if hint else [s for s in STRATEGIES if s not in HINTED]
        if log:
            from deepseemoe.dictionaries.config import check_loggers

            check_loggers(log)
        settings = PostTrainSettings(
            model=model, data=data, eval=eval_data, out=str(out), strategies=chosen, target_domain=target_domain,
            dense=dense, dense_rank=dense_rank, hint=hint, seeds=seeds, steps=steps, rank=rank, alpha=alpha, lr=lr, batch_size=batch_size,
            ctx_len=ctx_len, train_tokens=train_tokens, eval_tokens=eval_tokens, hint_features=hint_features,
            experts=experts, router_weight=router_weight, hold_weight=hold_weight, field=field,
            domain_field=domain_field, keep_adapters=keep_adapters, dtype=dtype or "float32", device=device,
            device_map=device_map, log=list(log or []))
        c = out_console()
        result = post_train(settings, trust_remote_code=trust_remote_code, progress=True, echo=c.print)
        if result.hint:
            h = result.hint
            c.print(f"hint: layer {h['layer']} · features {h['features']} · experts {h['experts']} · "
                    f"{h['routed_before']:.1%} of hint tokens on them before training")
        if result.reused:
            c.print(f"reused {len(result.reused)} finished point(s) of an earlier run")
        c.print(result.run.table_markdown())
        c.print(f"[green]→ {result.run.path}[/]")
