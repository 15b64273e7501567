"""The sweep's figures (PNG, matplotlib's Agg backend): FVU and spliced ΔCE against the reach, mean
± sd over seeds; and each reach's FVU per layer (which layers a wider reach helps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sweep_figures(rows: list[dict], layers: list[int], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    labels = [r["reach"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in ((axes[0], "fvu", "held-out FVU"), (axes[1], "delta_ce", "spliced ΔCE (nats/token)")):
        y = np.array([r[key] for r in rows])
        sd = np.nan_to_num(np.array([r[f"{key}_sd"] for r in rows]))
        ax.errorbar(x, y, yerr=sd, marker="o", capsize=3)
        ax.set_xticks(x, labels)
        ax.set_xlabel("reach (neighbouring layers written)")
        ax.set_title(title, fontsize=10)
    fig.suptitle("equal latents per layer and equal L0; mean ± sd over seeds", fontsize=9)
    fig.tight_layout()
    paths.append(out / "reach.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for r in rows:
        ax.plot(layers, r["fvu_per_layer"], marker="o", label=f"reach {r['reach']}")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out FVU")
    ax.set_title("FVU per layer, by reach", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "fvu_per_layer.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
