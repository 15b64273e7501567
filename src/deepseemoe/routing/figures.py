"""PNG figures of the routing statistics (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int):
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def routing_figures(tables: dict, summary: dict, out: Path) -> dict[str, Path]:
    plt = _plt()
    figs: dict[str, Path] = {}
    load = tables["load"]
    layers = sorted(load["layer"].unique())

    matrix = load.pivot(index="layer", columns="expert", values="load").to_numpy()
    fig, ax = plt.subplots(figsize=(max(6, matrix.shape[1] * 0.35), 1.2 + 0.45 * len(layers)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="layer", title="Expert load (share of routing slots)",
           yticks=range(len(layers)), yticklabels=layers)
    fig.colorbar(im, ax=ax)
    figs["load"] = _save(fig, out / "load.png")

    co = tables["coactivation"]
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        sub = co[co["layer"] == layer]
        E = int(max(sub["expert_i"].max(), sub["expert_j"].max())) + 1 if len(sub) else 1
        m = np.full((E, E), np.nan)
        m[sub["expert_i"], sub["expert_j"]] = sub["p_j_given_i"]
        im = ax.imshow(m, cmap="magma", vmin=0)
        ax.set(title=f"layer {layer}: P(j | i)", xlabel="j", ylabel="i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    figs["coactivation"] = _save(fig, out / "coactivation.png")

    dom = tables["domain"]
    if len(dom) and dom["domain"].notna().any():
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.5 + 0.4 * dom["domain"].nunique() * rows + 1),
                                 squeeze=False)
        for ax, layer in zip(axes.flat, layers, strict=False):
            sub = dom[dom["layer"] == layer].pivot(index="domain", columns="expert", values="share")
            im = ax.imshow(sub.to_numpy(), aspect="auto", cmap="Blues")
            ax.set(title=f"layer {layer}: expert × domain", xlabel="expert", yticks=range(len(sub.index)),
                   yticklabels=[str(d) for d in sub.index])
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        figs["domain"] = _save(fig, out / "domain.png")

    per_layer = summary["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(layers))
    rep = [per_layer[str(layer)]["repetition"] for layer in layers]
    ax.bar(x - 0.27, [r["top1_same"] for r in rep], 0.27, label="observed")
    ax.bar(x, [r["top1_same_load_matched"] for r in rep], 0.27, label="load-matched baseline")
    ax.bar(x + 0.27, [r["top1_same_uniform"] for r in rep], 0.27, label="uniform baseline")
    ax.set(xticks=x, xticklabels=layers, xlabel="layer", ylabel="share of consecutive tokens",
           title="Same top-1 expert for consecutive tokens")
    ax.legend(fontsize=8)
    figs["repetition"] = _save(fig, out / "repetition.png")

    mi = [(layer, per_layer[str(layer)].get("transition_to_next", {}).get("nmi")) for layer in layers]
    mi = [(layer, v) for layer, v in mi if v is not None]
    if mi:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([m[0] for m in mi], [m[1] for m in mi], marker="o")
        ax.set(xlabel="layer l", ylabel="NMI(top-1 at l; top-1 at next)", title="Cross-layer expert paths",
               xticks=[m[0] for m in mi])  # layers are integers: no 0.5 ticks between them
        figs["transitions"] = _save(fig, out / "transitions.png")
    return figs


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)
    return path
