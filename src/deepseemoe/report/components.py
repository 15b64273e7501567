"""Components shared by the static report and the explorer; templates/components.html.j2 draws them.

- the token-routing strip: one column per token, one row per MoE layer, each cell coloured by the
  token's top-1 expert there (hover: the top-k experts and weights, the router's next choices);
- heatmaps (a matrix as shaded, optionally linked cells) and bars.

Shapes: tokens [T]; per layer, experts [T][K] and weights [T][K] (rank 0 = highest weight).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

# Twenty colours chosen to be told apart (Sasha Trubetskoy's list): the first 16 are ≥ 29 ΔE (CIE76)
# from each other. Golden-ratio hues, which this replaced, put E0/E8, E6/E14 … within 11–17 ΔE.
DISTINCT = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
            "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1",
            "#000075", "#808080")


def expert_colors(n: int) -> tuple[list[str], list[str]]:
    """n background colours (DISTINCT, then golden-ratio hues at three lightnesses beyond 20) and a
    readable text colour each."""
    colors, text = [], []
    for i in range(n):
        if i < len(DISTINCT):
            r, g, b = (int(DISTINCT[i][j:j + 2], 16) / 255 for j in (1, 3, 5))
        else:
            r, g, b = colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, (0.45, 0.6, 0.75)[i % 3], 0.65)
        colors.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
        text.append("#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff")
    return colors, text


def show_token(text: str) -> str:
    """A token's text with its whitespace visible."""
    return text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")


@dataclass
class StripCell:
    experts: list[int]  # [K], rank order
    weights: list[float]  # [K]
    alternatives: list[tuple[int, float]] = field(default_factory=list)  # best unchosen (expert, router prob)
    margin: float | None = None  # router logit of the last chosen expert minus the best unchosen one
    changed: bool = False  # under an intervention: the expert set differs from the clean run's

    @property
    def top(self) -> int:
        return self.experts[0]

    @property
    def ids(self) -> str:
        """The experts as "3,5" (rank order): the cell's data-experts."""
        return ",".join(map(str, self.experts))

    @property
    def title(self) -> str:
        text = ", ".join(f"E{e}: {w:.2f}" if w == w else f"E{e}"  # no weight recorded: NaN
                         for e, w in zip(self.experts, self.weights, strict=True))
        if self.alternatives:
            text += " | next: " + ", ".join(f"E{e} p={p:.2f}" for e, p in self.alternatives)
        if self.margin is not None:
            text += f" | margin {self.margin:.2f}"
        return text


@dataclass
class Strip:
    tokens: list[str]  # shown text of each token (show_token)
    rows: list[tuple[int, list[StripCell]]]  # (MoE layer, one cell per token)
    label: str = ""

    @classmethod
    def from_arrays(cls, tokens: list[str], routing: dict, label: str = "",
                    alternatives: dict | None = None, margins: dict | None = None,
                    changed: dict | None = None, frame: int | None = None) -> Strip:
        """`routing` {layer: (experts [T, K], weights [T, K])}; optional per layer:
        alternatives [T] lists of (expert, prob), margins [T], changed [T] bools. Characters cut across
        tokens are shown whole (`token_text.joined_texts`; `frame`: the token a context centres on)."""
        from deepseemoe.data.token_text import joined_texts

        tokens = joined_texts(tokens, frame)
        rows = []
        for layer in sorted(routing):
            e, w = routing[layer]
            cells = []
            for t in range(len(tokens)):
                cells.append(StripCell([int(x) for x in e[t]], [float(x) for x in w[t]],
                                       list(alternatives[layer][t]) if alternatives else [],
                                       float(margins[layer][t]) if margins else None,
                                       bool(changed[layer][t]) if changed else False))
            rows.append((layer, cells))
        return cls([show_token(t) for t in tokens], rows, label)


@dataclass
class Heatmap:
    """A matrix drawn as a table of shaded cells: values [R][C] in [0, vmax], cells optionally linked."""

    row_labels: list[str]
    col_labels: list[str]
    values: list[list[float]]
    caption: str = ""
    fmt: str = "%.2f"
    links: list[list[str | None]] | None = None  # [R][C] URL of each cell's unit
    vmax: float | None = None

    def __post_init__(self) -> None:
        if not self.vmax:  # the largest finite value, once (not per cell)
            self.vmax = max((x for row in self.values for x in row if x == x), default=1.0) or 1.0

    def shade(self, v: float) -> str:
        """Background colour of a value: white to deep blue, linear in v / vmax."""
        a = 0.0 if v != v else min(max(v / self.vmax, 0.0), 1.0)
        r, g, b = (int(255 - a * (255 - c)) for c in (33, 102, 172))
        return f"#{r:02x}{g:02x}{b:02x}"

    def ink(self, v: float) -> str:
        return "#fff" if v == v and v / self.vmax > 0.6 else "#222"

    def cells(self) -> list[tuple[str, list[tuple[str, str, str, str | None]]]]:
        """Per row: its label and (text, background, ink, link) per cell, formatted once here rather
        than per cell in the template (a 64 × 64 matrix is 4,096 cells)."""
        out = []
        for i, (label, row) in enumerate(zip(self.row_labels, self.values, strict=True)):
            links = self.links[i] if self.links else [None] * len(row)
            out.append((label, [(self.fmt % v, self.shade(v), self.ink(v), link)
                                for v, link in zip(row, links, strict=True)]))
        return out


@dataclass
class Bar:
    label: str
    value: float
    text: str = ""
    link: str | None = None
