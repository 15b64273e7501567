"""`deepseemoe evaluate RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import (
    batch_size_option,
    device_map_option,
    run_device_option,
    trust_remote_code_option,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`."),
        data: str = typer.Option(None, help="Held-out text (default: the training data, which is not held out)."),
        tokens: int = typer.Option(20_000, min=1, help="Evaluation tokens."),
        batch_size: int = batch_size_option(),
        device: str = run_device_option(),
        device_map: str = device_map_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """FVU, L0, dead/dense latents, spliced ΔCE / KL / loss recovered, routing preserved, and sparse
        probing of the documents' domains beside a random dictionary's."""
        from rich.table import Table

        from deepseemoe.dictionaries.evaluate import evaluate_run
        from deepseemoe.progress import out_console
        from deepseemoe.runs.dictionary import DictionaryRun

        run = DictionaryRun.open(run_dir)
        doc = evaluate_run(run_dir, data=data, tokens=tokens, batch_size=batch_size, device=device, device_map=device_map,
                           trust_remote_code=trust_remote_code)
        cols = ["fvu", "l0", "dead", "dense", "delta_ce", "kl", "loss_recovered", "routing_preserved"]
        heads = ["FVU", "L0", "dead", "dense", "ΔCE", "KL", "recovered", "routing"]
        rows = [[name, *[(f"{r[c]:.1f}" if c == "l0" else f"{r[c]:.3f}") if r.get(c) is not None else "—"
                         for c in cols]] for name, r in doc["coders"].items()]
        title = f"{doc['tokens']:,} tokens of {doc['data']}"
        console = out_console()
        if console.is_terminal:
            table = Table(title=title)
            table.add_column("coder", no_wrap=True)
            for h in heads:
                table.add_column(h, justify="right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            console.print(table)
        else:  # piped or redirected: plain aligned text, never squeezed to 80 columns
            widths = [max(len(x) for x in col) for col in zip(["coder", *heads], *rows, strict=True)]
            print(title)
            for row in [["coder", *heads], *rows]:
                print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths,
                                                                                                  strict=True))))
        for name, r in doc["coders"].items():
            if "loss_recovered_note" in r:
                print(f"{name}: loss recovered {r['loss_recovered_note']}")
        for name, r in doc["coders"].items():
            sp = r.get("sparse_probing", {})
            if "k" in sp:
                ks = list(sp["k"])

                def line(what: str, sp=sp, ks=ks) -> str:
                    return " / ".join(f"{sp['k'][k][what]:.2f}" for k in ks)
                print(f"{name}: sparse probing of {len(sp['labels'])} domains ({sp['documents']} documents), balanced "
                      f"accuracy at k = {', '.join(ks)}: latents {line('latents')}, random dictionary "
                      f"{line('random')}, raw top-k {line('raw_topk')}, raw all {sp['raw_dims']} dims {sp['raw_all']:.2f}")
            elif "note" in sp:
                print(f"{name}: {sp['note']}")
            ab = r.get("absorption", {})
            if "absorption" in ab.get("trained", {}):
                t, rnd = ab["trained"], ab["random"]
                print(f"{name}: feature absorption (first letters, {len(t['letters'])} letters): full "
                      f"{t['absorption']:.3f}, fraction {t['absorption_fraction']:.3f}, main latent silent "
                      f"{t['miss']:.3f}; random dictionary {rnd.get('absorption', float('nan')):.3f} / "
                      f"{rnd.get('absorption_fraction', float('nan')):.3f} / {rnd.get('miss', float('nan')):.3f}")
            elif "note" in ab.get("trained", {}):
                print(f"{name}: {ab['trained']['note']}")
            ls = r.get("layer_spread")
            if ls and ls["features"]:
                hist = ", ".join(f"{s} layer{'s' if s != '1' else ''} {n / ls['features']:.0%}"
                                 for s, n in ls["histogram"].items() if n)
                offsets = ("; mean share at offset 0, 1, …: " + ", ".join(f"{v:.2f}" for v in ls["share_by_offset"])
                           if "share_by_offset" in ls else "")
                print(f"{name}: layers each live feature writes to (≥ {ls['threshold']:.0%} of its decoder's energy): "
                      f"{hist}{offsets}")
        path = run.save_evaluation(doc)
        print(f"→ {path} (FVU: {doc['fvu_normalisation']})")
