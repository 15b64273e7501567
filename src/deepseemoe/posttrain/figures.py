"""The post-training study's figures (PNG, matplotlib's Agg backend): what each strategy gained on the
target against what it cost elsewhere, one point per seed; and routing drift per MoE layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# one colour per strategy, in the table's order; the dense twin in grey
COLORS = {"all": "#1f77b4", "frozen-router": "#17becf", "router-only": "#9467bd", "experts-by-hint": "#2ca02c",
          "router-by-hint": "#d62728", "random-experts": "#8c8c3c", "dense-all": "#555555"}


def posttrain_figures(points: list[dict], out: Path) -> list[Path]:
    """`points`: every finished point's result.json. Writes OUT/gain_forgetting.png and, when the
    points measured routing, OUT/drift_by_layer.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[dict]] = {}
    for p in points:
        by.setdefault(p["strategy"], []).append(p)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, docs in by.items():
        x = np.array([d["forgetting"] for d in docs])
        y = -np.array([d["target_delta_ce"] for d in docs])  # the gain: the target's CE went down by y
        c = COLORS.get(strategy, "#000000")
        ax.scatter(x, y, s=22, color=c, alpha=0.75, label=("dense twin, all" if strategy == "dense-all" else strategy))
        ax.scatter([x.mean()], [y.mean()], s=90, color=c, marker="+")
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("forgetting: mean ΔCE on the other domains (nats, + is worse)")
    ax.set_ylabel("gain on the target: −ΔCE (nats)")
    ax.set_title("gain vs forgetting, one point per seed (+: mean)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out / "gain_forgetting.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    routed = {s: docs for s, docs in by.items() if docs[0].get("layers")}
    if routed:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for strategy, docs in routed.items():
            layers = sorted(docs[0]["layers"], key=int)
            drift = np.array([[d["layers"][la]["drift"] for la in layers] for d in docs])
            sd = drift.std(0, ddof=1) if len(docs) > 1 else np.zeros(len(layers))
            ax.errorbar([int(la) for la in layers], drift.mean(0), yerr=sd, marker="o", ms=4, capsize=2,
                        color=COLORS.get(strategy, "#000000"), label=strategy)
        ax.set_xticks(sorted({int(la) for docs in routed.values() for la in docs[0]["layers"]}))
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("routing drift (share of top-k slots moved)")
        ax.set_title("routing drift per layer, mean ± sd over seeds", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out / "drift_by_layer.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
