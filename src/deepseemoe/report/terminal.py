"""What the verbs print: their results as rich tables, from the rows the report shows
(`report.tables`), so that a figure reads the same in the terminal and in the report."""

from __future__ import annotations

from rich.table import Table

from deepseemoe.report.tables import causal_rows, removal_table


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*r)
    return table


def _f(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def causal_checks(result: dict) -> list:
    """ablation.json: per layer, the most damaging expert beside its control; then the top-r sweep."""
    rows = [[str(r.layer), _f(r.random), _f(r.top1),
             f"{r.worst:.4f} (E{r.worst_expert})" if r.worst is not None else "—", _f(r.control), _f(r.rho_load, ".2f")]
            for r in causal_rows(result)]
    out: list = [_table(f"ΔCE (nats/token) on {result['tokens']:,} held-out tokens",
                        ("layer", "random routing", "top-1 only", "max expert ablation", "its control", "ρ(load, ΔCE)"),
                        rows)]
    out += [f"  top-{s['disabled_top_r']} experts disabled in every layer: ΔCE {s['delta_ce']:.4f}"
            for s in result["disable_top_r"]]
    return out


def removal(result: dict) -> Table:
    """removal.json: per model and unit kind, the selected units' target and off-target ΔCE beside random ones."""
    t = removal_table(result)
    rows = [[r.model, f"{r.units}/{r.of}", r.kind, _f(r.selected["target"]), _f(r.selected["off_target"]),
             _f(r.selected["gap"]), _f((r.random or {}).get("target", float("nan"))),
             _f((r.random or {}).get("off_target", float("nan")))] for r in t.rows]
    where = f", units of layers {', '.join(map(str, t.layers))} only" if t.layers else ""
    return _table(f"Removing {t.target}{where}: ΔCE (nats/token) on held-out predictions",
                  ("model", "units", "kind", "target", "off-target", "gap", "random: target", "random: off-target"), rows)


def ternary_loss(result: dict) -> Table:
    """ternary.json's `loss`: per domain, the held-out loss in float and ternary."""
    rows = [[d, f"{r['float']:.4f}", f"{r['ternary']:.4f}", f"{r['ternary'] - r['float']:+.4f}"]
            for d, r in result["loss"].items()]
    return _table("held-out loss, nats/token", ("domain", "float", "ternary", "Δ"), rows)


def evaluation(doc: dict, console) -> None:
    """evaluation.json: one row per coder (a rich table in a terminal; plain aligned text when piped or
    redirected, never squeezed to 80 columns), then each coder's notes, sparse probing, absorption and
    layer spread as one line each."""
    cols = ["fvu", "l0", "dead", "dense", "delta_ce", "kl", "loss_recovered", "routing_preserved"]
    heads = ["FVU", "L0", "dead", "dense", "ΔCE", "KL", "recovered", "routing"]
    rows = [[name, *[(f"{r[c]:.1f}" if c == "l0" else f"{r[c]:.3f}") if r.get(c) is not None else "—"
                     for c in cols]] for name, r in doc["coders"].items()]
    title = f"{doc['tokens']:,} tokens of {doc['data']}"
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


def scores(summary: dict) -> list[str]:
    """The scores' summary.json: per scorer, the descriptions' balanced accuracy beside the shuffled
    descriptions' and token identity's, the AUROC, and what the judge answered (flagged when its
    answers say nothing)."""
    lines = []
    for name, entry in summary["scorers"].items():
        own, base = entry["explanation"], entry["shuffled_explanation"]
        line = (f"{name}: balanced accuracy {own['balanced_accuracy']:.3f} (F1 {own['f1']:.3f}; "
                f"{own['scored']}/{own['examples']} examples answered)")
        if base:
            line += f" · shuffled explanations {base['balanced_accuracy']:.3f}"
        if "token_baseline" in entry:
            line += f" · token identity {entry['token_baseline']['balanced_accuracy']:.3f}"
        if own["auroc"] is not None:
            line += f" · AUROC {own['auroc']:.3f}" + (f" (shuffled {base['auroc']:.3f})"
                                                      if base and base["auroc"] is not None else "")
        judge = own["judge"]
        line += f" · the judge answered 1 {judge['answered_1']}×, 0 {judge['answered_0']}×"
        if judge["flag"]:
            line += f" · [bold red]the judge {judge['flag']}: these scores say nothing about the explanations[/]"
        lines.append(line)
    return lines


def zoo_losses(report: dict, columns: dict[str, dict], where: str) -> Table:
    """`zoo train`: validation loss per domain of each model (`columns`: label → domain → loss) beside
    the unigram baseline."""
    table = Table(title=f"validation loss, nats/token ({where})")
    for col in ("domain", *columns, "unigram"):
        table.add_column(col)
    for d in sorted(report["val_loss"]["moe"]):
        table.add_row(d, *(f"{v[d]:.3f}" for v in columns.values()), f"{report['unigram_baseline'][d]:.3f}")
    return table


def zoo_models(root, entries: list) -> Table:
    """`zoo list`: each cache entry (`zoo.train.CachedEntry`), whether it finished, and its model folders."""
    table = Table(title=f"models in {root}")
    for col in ("entry", "state", "model", "folder"):
        table.add_column(col)
    for entry in entries:
        state = "complete" if entry.complete else "incomplete (interrupted training)"
        for i, folder in enumerate(entry.models or [entry.path]):
            table.add_row(entry.path.name if i == 0 else "", state if i == 0 else "",
                          folder.name if entry.models else "–", str(folder))
    return table


def carve_report(r: dict, routed: int, shared: int, cached: bool) -> list:
    """`zoo carve`'s report.json: held-out CE per domain, dense vs carved at each k, then the router's
    recall, the block outputs' error and what the carve cost."""
    from deepseemoe.zoo.carve import router_mean

    ce = r["ce"]
    table = Table(title=f"held-out CE, nats/token ({r['heldout_tokens']:,} tokens): dense vs carved, k of {routed} "
                        f"routed experts + {shared} shared")
    table.add_column("domain")
    table.add_column("dense")
    for k in ce["carved"]:
        table.add_column(f"k={k}")
    for d in ce["dense"]:
        table.add_row(d, f"{ce['dense'][d]:.3f}", *(f"{v[d] - ce['dense'][d]:+.3f}" for v in ce["carved"].values()))
    recall, err = router_mean(r, "recall"), router_mean(r, "relative_error")
    how = "cached" if cached else f"carved in {r['carve_seconds']} s"
    return [table,
            "router recall of the true top-k (mean over carved layers): "
            + ", ".join(f"k={k} {v:.2f}" for k, v in recall.items()),
            "block output relative error: " + ", ".join(f"k={k} {v:.2f}" for k, v in err.items()),
            f"{how} ({len(r['layers'])} layers, {r['calibration_tokens']:,} calibration tokens, peak "
            f"{r['peak_rss_gb']} GB)"]
