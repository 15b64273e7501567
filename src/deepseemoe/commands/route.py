"""`deepseemoe route MODEL --data SOURCE --out RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import batch_size_option, model_device_option, trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def route(
        model: str = typer.Argument(..., help="Hub id or local folder of a causal LM with MoE layers."),
        data: str = typer.Option(..., "--data", help="Local file/folder/glob (.jsonl, .jsonl.zst, .parquet, .txt) "
                                                     "or hf:DATASET (streamed)."),
        out: Path = typer.Option(..., "--out", help="Run directory to write tokens/, routing/ and run.json into."),
        field: str = typer.Option("text", help="Text field of each record."),
        domain_field: str = typer.Option(None, help="Field holding a domain label."),
        domain_from_file: bool = typer.Option(False, help="Use each file's name as the domain label."),
        hf_config: str = typer.Option(None, help="Dataset config name (hf: sources)."),
        split: str = typer.Option("train", help="Dataset split (hf: sources)."),
        data_files: str = typer.Option(None, help="data_files for hf:json / hf:parquet loaders."),
        min_chars: int = typer.Option(0, min=0, help="Skip documents shorter than this."),
        max_chars: int = typer.Option(None, min=1, help="Skip documents longer than this."),
        max_docs: int = typer.Option(None, min=1, help="Stop after this many documents."),
        max_tokens: int = typer.Option(None, min=1, help="Stop after this many tokens (BOS included)."),
        ctx_len: int = typer.Option(None, min=1, help="Context length of the packed sequences (default: 256, or the "
                                     "model's position limit when smaller)."),
        batch_size: int = batch_size_option(),
        device: str = model_device_option(),
        device_map: str = typer.Option(None, help="device_map for models larger than one device, e.g. auto."),
        dtype: str = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)."),
        logits: bool = typer.Option(False, "--logits", help="Also store the router logits (logits/)."),
        keep_bos: bool = typer.Option(False, help="Keep BOS tokens in the records."),
        seed: int = typer.Option(0, min=0, help="Seed for --shuffle."),
        shuffle: bool = typer.Option(False, help="Shuffle the order of the source files with --seed."),
        shard_tokens: int = typer.Option(1_000_000, min=1, help="Tokens per parquet shard."),
        buffer_gb: float = typer.Option(2.0, min=0.01, help="Memory the writer may hold for one shard (GB): a shard "
                                        "closes at --shard-tokens or at this, whichever comes first."),
        overwrite: bool = typer.Option(False, help="Replace the routing run in --out (kept until the new one is "
                                                   "complete)."),
        rank_split: str = typer.Option("contexts", help="Under torchrun: contexts (every rank packs the same "
                                       "contexts and routes every N-th batch: the routing of one process) or "
                                       "documents (each rank reads only its share of the documents: a streamed "
                                       "source is not read N times; contexts differ from one process's)."),
        resume: bool = typer.Option(False, help="Keep the shards a killed run of the same command finished and route "
                                                "only the rest."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Record which experts every token is routed to, in every MoE layer.

        Under `torchrun --nproc-per-node N -m deepseemoe.cli route ...` every rank routes every N-th
        batch of the same packed contexts (with `--device cuda`, each on its own GPU) and rank 0
        writes one run."""
        from deepseemoe.data.sources import TextSource, resolve_files
        from deepseemoe.distributed import join, rank_device
        from deepseemoe.models.load import load_model
        from deepseemoe.progress import out_console
        from deepseemoe.routing.route import route_corpus

        if rank_split not in ("contexts", "documents"):
            from deepseemoe.errors import DeepSeeMoEError

            raise DeepSeeMoEError(f"--rank-split {rank_split} is not one of contexts, documents")
        if not data.startswith("hf:"):
            resolve_files(data)  # fail on a bad path before spending time on the model
        world = join("gloo")  # the ranks exchange only small records; each forward stays on its own device
        handle = load_model(model, dtype=dtype, device=rank_device(device, world), device_map=device_map,
                            trust_remote_code=trust_remote_code)
        source = TextSource(data, field=field, domain_field=domain_field, domain_from_file=domain_from_file,
                            hf_config=hf_config, split=split, data_files=data_files, min_chars=min_chars,
                            max_chars=max_chars, max_docs=max_docs, shuffle=shuffle, seed=seed)
        result = route_corpus(handle, source, out, ctx_len=ctx_len, batch_size=batch_size, max_tokens=max_tokens,
                              logits=logits, exclude_bos=not keep_bos, extra={"seed": seed},
                              overwrite=overwrite, shard_tokens=shard_tokens, buffer_gb=buffer_gb, resume=resume,
                              world=world, rank_split=rank_split)
        world.close()
        if not world.main:
            return
        kept = f", {result.resumed_tokens:,} of them kept from the interrupted run" if result.resumed_tokens else ""
        ranks = f" on {world.size} ranks" if world.size > 1 else ""
        gpu = f", peak GPU memory {result.peak_gpu_gb:.1f} GB" if result.peak_gpu_gb is not None else ""
        out_console().print(f"[green]routed {result.tokens:,} tokens[/]{kept} through {len(result.layers)} MoE layers"
                            f"{ranks} in {result.seconds:.1f}s ({result.tokens_per_second:,.0f} tok/s{gpu}) → "
                            f"{result.run_dir}")
