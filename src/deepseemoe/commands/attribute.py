"""`deepseemoe attribute RUN_DIR --dictionary NAME --prompt TEXT [--target TOKEN] --out GRAPH.json`: the
attribution graph of one prompt through the router and the experts (deepseemoe.attribution)."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import dictionary_name, run_device_option, trust_remote_code_option


def register(app: typer.Typer) -> None:
    @app.command()
    def attribute(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        dictionary: list[str] = typer.Option(..., "--dictionary",
                                             help="An SAE on an MoE block's input (router edges), a transcoder of "
                                                  "a block or a cross-layer transcoder of several, from the run "
                                                  "(repeatable, one per layer)."),
        prompt: str = typer.Option(..., "--prompt", help="The text to explain (a BOS token is put in front)."),
        target: str = typer.Option(None, "--target", help="The next token to explain (one token, leading space "
                                                          "included); default: the model's top prediction."),
        out: Path = typer.Option(..., "--out", help="Where to write the graph (circuit-tracer's graph JSON)."),
        node_threshold: float = typer.Option(0.8, min=0.0, max=1.0,
                                             help="Keep the nodes carrying this share of the influence on the logits."),
        edge_threshold: float = typer.Option(0.98, min=0.0, max=1.0, help="Keep the edges carrying this share of it."),
        max_logits: int = typer.Option(5, min=1, help="Candidate next tokens explained (until 95 % probability)."),
        batch_size: int = typer.Option(64, min=1, help="Target nodes per backward pass."),
        max_nodes: int = typer.Option(None, min=1, help="Expand at most this many feature, routing and expert "
                                                        "nodes, the most influential on the logits first (memory "
                                                        "grows with it, not with the square of all nodes); "
                                                        "default: all."),
        perturb: int = typer.Option(8, min=0, help="Zero this many of the most influential features in the model "
                                                   "itself (routing free) and compare with the linear prediction."),
        device: str = run_device_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Which features decided each routing decision, what the chosen experts wrote, and how it reached the
        predicted token: a pruned graph whose edges are exact direct effects."""
        from deepseemoe.attribution.export import perturbation_sentence
        from deepseemoe.attribution.prompts import (
            attribute_prompt,
            prompt_ids,
            target_id,
        )
        from deepseemoe.dictionaries.trained import TrainedRun
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.explain.mapping import feature_descriptions
        from deepseemoe.progress import num, out_console
        from deepseemoe.runs.atomic import atomic_write_json

        if out.suffix != ".json":
            raise DeepSeeMoEError(f"--out {out} should name a .json file (the graph is circuit-tracer's graph JSON)")
        # float32: the edges are sums of many small products, which bf16 would blur
        trained = TrainedRun.open(run_dir, device=device, dtype="float32", trust_remote_code=trust_remote_code)
        names = [dictionary_name(run_dir, d) for d in dictionary]
        dictionaries = {name: (coder, record.meta) for name, (coder, record) in trained.coders(names).items()}
        handle = trained.model()
        if not handle.is_moe:
            raise DeepSeeMoEError(f"{handle.name} has no MoE layer; attribute explains routing decisions")
        ids = prompt_ids(handle, prompt)  # bad prompts and targets are refused before the graph is built
        if target is not None:
            target_id(handle, target)
        result = attribute_prompt(handle, dictionaries, prompt, target=target, node_threshold=node_threshold,
                                  edge_threshold=edge_threshold, max_logits=max_logits, batch_size=batch_size,
                                  max_targets=max_nodes,
                                  scan=str(trained.spec.model), slug=out.stem,
                                  descriptions=feature_descriptions(run_dir, names), perturb=perturb,
                                  progress=True)
        graph, doc = result.graph, result.doc
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, doc)
        console = out_console()
        for note in graph.summary.get("notes", []):
            console.print(f"[yellow]note:[/] {note}")
        s = graph.summary
        t = graph.nodes[graph.target]
        console.print(f"{len(ids)} tokens · target {t.extra.get('token', t.index)!r} (p={num(t.extra['probability'])}) · "
                      f"{s['nodes']} nodes, {s['edges']} edges → kept {s['kept_nodes']} nodes, {s['kept_edges']} edges, "
                      f"{s['kept_influence']:.0%} of the influence · error nodes carry {s['error_influence']:.0%} · "
                      f"{graph.seconds:.1f} s")
        if "bounded" in s:
            b = s["bounded"]
            console.print(f"bounded: {b['expanded']:,} of {b['targets']:,} target nodes expanded (--max-nodes "
                          f"{b['max_nodes']:,}); the rest left the graph, their effects in their targets' bias")
        console.print(result.sentence)
        if perturb:
            console.print(perturbation_sentence(s.get("perturbation")))
        console.print(f"[green]→ {out}[/]")
