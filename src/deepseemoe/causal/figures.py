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


def removal_figure(result: dict, path: Path) -> Path:
    """Target vs off-target ΔCE of each model's unit kinds (`ablate --target`): the most specific
    units beside the same number drawn at random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, kind, r) for label, m in result["models"].items() for kind, r in m["kinds"].items()]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.4))
    x = np.arange(len(rows))
    bars = [("selected", "target", "#c0392b", 0.0), ("selected", "off_target", "#e6a19a", 0.2),
            ("random", "target", "#2c3e50", 0.4), ("random", "off_target", "#95a5a6", 0.6)]
    for which, part, color, dx in bars:
        vals = [(r[which] or {}).get(part, np.nan) for _, _, r in rows]
        ax.bar(x + dx - 0.3, vals, 0.2, color=color, label=f"{which}: {part.replace('_', '-')}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [f"{label}\n{kind.replace('_', ' ')}\n({r['units']} units)" for label, kind, r in rows],
                  fontsize=7)
    ax.set_ylabel("ΔCE (nats/token)")
    ax.set_title(f"Removing {result['target']['label']}: target vs off-target damage", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
