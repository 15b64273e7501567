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
    return _table(f"Removing {t.target}: ΔCE (nats/token) on held-out predictions",
                  ("model", "units", "kind", "target", "off-target", "gap", "random: target", "random: off-target"), rows)


def ternary_loss(result: dict) -> Table:
    """ternary.json's `loss`: per domain, the held-out loss in float and ternary."""
    rows = [[d, f"{r['float']:.4f}", f"{r['ternary']:.4f}", f"{r['ternary'] - r['float']:+.4f}"]
            for d, r in result["loss"].items()]
    return _table("held-out loss, nats/token", ("domain", "float", "ternary", "Δ"), rows)
