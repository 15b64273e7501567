"""`deepseemoe ablate MODEL --data SOURCE --out DIR`: causal checks of experts and routers;
with `--target`, the removal of one behaviour (`causal/removal.py`)."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import (
    batch_size_option,
    device_map_option,
    dictionary_name,
    dtype_option,
    int_list,
    model_device_option,
    trust_remote_code_option,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def ablate(
        model: str = typer.Argument(..., help="Hub id, local folder, or tiny:MODEL_TYPE."),
        data: str = typer.Option(..., "--data", help="Held-out text: file/folder/glob or hf:DATASET."),
        out: Path = typer.Option(..., "--out", help="Folder for ablation.json and figures."),
        tokens: int = typer.Option(20_000, min=1, help="Held-out tokens."),
        ctx_len: int = typer.Option(None, min=1, help="Context length (default: 256, or the model's position limit when smaller)."),
        batch_size: int = batch_size_option(),
        layers: str = typer.Option(None, help="MoE layers to ablate in, e.g. 0,3 or 2-5 (default: all); with --target, "
                                   "the layers whose units may be removed, in MODEL and --twin alike."),
        experts: str = typer.Option(None, help="Experts to ablate, e.g. 0,1,2 (default: all)."),
        domain_field: str = typer.Option("domain", help="Field holding each document's domain label."),
        device: str = model_device_option(),
        dtype: str = dtype_option(),
        device_map: str = device_map_option(),
        seed: int = typer.Option(0, min=0, help="Seed of the random controls and random routing."),
        target: str = typer.Option(None, "--target", help="Remove one behaviour instead: domain:NAME (or NAME), "
                                   "tokens:A,B,… or ids:1,2,… — the most specific units of each kind are "
                                   "ablated and target vs off-target ΔCE reported (writes removal.json)."),
        twin: str = typer.Option(None, "--twin", help="With --target: a second model (e.g. the dense twin), given "
                                 "the same budget."),
        budget: float = typer.Option(None, "--budget", help="With --target: share of each kind's units to remove "
                                     "(default: one expert's share, 1/E; 1/16 for a dense model)."),
        units: int = typer.Option(None, "--units", min=1, help="With --target: ablate exactly this many units of "
                                  "each kind instead of a parameter budget."),
        kinds: str = typer.Option("expert,expert_neuron,mlp_neuron,attention_head,feature,module", "--kinds",
                                  help="With --target: unit kinds to try (feature: with --dictionary; module: when "
                                  "`deepseemoe graph` ran on that dictionary)."),
        draws: int = typer.Option(3, min=0, help="With --target: random same-size choices per kind."),
        dictionary: str = typer.Option(None, "--dictionary", help="With --target: RUN_DIR:NAME, a single-site SAE "
                                       "of MODEL (from `deepseemoe train`) whose features, and the modules of its "
                                       "`graph`, are unit kinds too."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Expert ablation/exclusion vs load-matched controls, top-r sweep, top-1 and random routing per layer;
        or, with --target, remove a domain or token set and measure the side effects."""
        from deepseemoe.causal.checks import run_causal_checks
        from deepseemoe.causal.figures import causal_figures
        from deepseemoe.data.sources import resolve_files
        from deepseemoe.data.tokens import heldout_batches
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.models.load import load_model
        from deepseemoe.progress import out_console
        from deepseemoe.report import terminal
        from deepseemoe.runs.study import save_ablation

        if target is None and (twin or budget is not None or units is not None or dictionary):
            raise DeepSeeMoEError("--twin, --budget, --units and --dictionary choose what --target removes; "
                                  "add --target")
        if target is not None and experts:
            raise DeepSeeMoEError("--experts chooses the causal checks' units; --target chooses its own: drop it "
                                  "(--layers limits where)")
        if not data.startswith("hf:"):
            resolve_files(data)

        def parse(text: str | None, option: str) -> list[int] | None:
            return int_list(text, option) if text else None

        load = dict(dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
        text = dict(tokens=tokens, ctx_len=ctx_len, batch_size=batch_size, domain_field=domain_field)
        if target is not None:
            _remove(model, twin, data, out, target=target, budget=budget, units=units, kinds=kinds, draws=draws,
                    seed=seed, dictionary=dictionary, load=load, text=text, layers=parse(layers, "--layers"))
            return
        handle = load_model(model, **load)
        if not handle.is_moe:
            raise DeepSeeMoEError(f"{model} has no MoE layers to ablate")
        result = run_causal_checks(handle, heldout_batches(handle, data, **text), layers=parse(layers, "--layers"),
                                   experts=parse(experts, "--experts"), seed=seed)
        result["model"] = handle.name
        figures: list = []
        path = save_ablation(out, result, lambda folder: figures.extend(causal_figures(result, folder)))
        console = out_console()
        console.print(*terminal.causal_checks(result), sep="\n")
        console.print(f"[green]→ {path}[/] and {len(figures)} figures")


def _remove(model: str, twin: str | None, data: str, out: Path, *, target: str, budget: float | None,
            units: int | None, kinds: str, draws: int, seed: int, dictionary: str | None, load: dict,
            text: dict, layers: list[int] | None) -> None:
    """`ablate --target`: the options checked before any model loads, then `removal_study` on the model
    (and its twin) at one budget."""
    from deepseemoe.causal.figures import removal_figure
    from deepseemoe.causal.removal import KINDS, Target, check_budget, load_dictionary, removal_study
    from deepseemoe.data.tokens import heldout_batches
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.models.load import load_model
    from deepseemoe.progress import out_console
    from deepseemoe.report import terminal
    from deepseemoe.runs.study import save_removal

    Target.check(target)
    check_budget(budget)
    wanted = tuple(k for k in kinds.split(",") if k)
    bad = [k for k in wanted if k not in KINDS]
    if bad or not wanted:
        raise DeepSeeMoEError(f"--kinds {kinds!r}: unknown {bad}; choose from {', '.join(KINDS)}")
    coder = None
    if dictionary is not None:
        run_dir, _, name = dictionary.rpartition(":")
        if not run_dir or not name:
            raise DeepSeeMoEError(f"--dictionary {dictionary!r}: give RUN_DIR:NAME, e.g. runs/dicts:sae_block_in_7")
        coder = load_dictionary(run_dir, dictionary_name(run_dir, name))
    sides = []
    for name in (model, twin):
        if name is not None:
            handle = load_model(name, **load)
            sides.append(("moe" if handle.is_moe else "dense", handle, heldout_batches(handle, data, **text)))
    if twin and sides[0][0] == sides[1][0]:
        sides = [("model", sides[0][1], sides[0][2]), ("twin", sides[1][1], sides[1][2])]
    result = removal_study(sides, target, budget=budget, units=units, kinds=wanted, draws=draws, seed=seed,
                           progress=True, dictionary=coder, layers=layers)
    path = save_removal(out, result, lambda p: removal_figure(result, p))
    console = out_console()
    console.print(terminal.removal(result))
    console.print(f"[green]→ {path}[/]")
