"""Figures of the causal checks (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def causal_figures(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = result["experts"]
    if rows:
        layers = sorted({r["layer"] for r in rows})
        experts = sorted({r["expert"] for r in rows})
        grid = np.full((len(layers), len(experts)), np.nan)
        for r in rows:
            grid[layers.index(r["layer"]), experts.index(r["expert"])] = r["ablate_delta_ce"]
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(experts) + 2), 0.5 * len(layers) + 1.6))
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(experts)), experts, fontsize=7)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title("ΔCE when one expert is ablated (nats/token)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / "ablation_delta_ce.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if result["layers"]:
        ls = [r["layer"] for r in result["layers"]]
        fig, ax = plt.subplots(figsize=(5, 3))
        x = np.arange(len(ls))
        ax.bar(x - 0.2, [r["random_routing_delta_ce"] for r in result["layers"]], 0.4, label="random routing")
        ax.bar(x + 0.2, [r["top1_only_delta_ce"] for r in result["layers"]], 0.4, label="top-1 only")
        ax.set_xticks(x, ls)
        ax.set_xlabel("layer")
        ax.set_ylabel("ΔCE (nats/token)")
        ax.set_title("One layer's routing changed")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "routing_corruption_by_layer.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
