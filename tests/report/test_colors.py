"""Expert colours a reader can tell apart: every pair of the first 16 at least 25 ΔE (CIE76) apart,
computed here from the sRGB → CIELAB definition (D65), not from the palette's own code."""

from __future__ import annotations

import itertools


def _lab(color: str) -> tuple[float, float, float]:
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    if len(color) == 4:  # "#fff"
        color = "#" + "".join(c * 2 for c in color[1:])
    r, g, b = (linear(int(color[i:i + 2], 16) / 255) for i in (1, 3, 5))
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def _delta_e(a: str, b: str) -> float:
    return sum((p - q) ** 2 for p, q in zip(_lab(a), _lab(b), strict=True)) ** 0.5


def test_sixteen_experts_get_clearly_distinct_colours():
    from deepseemoe.report.components import expert_colors

    colors, text = expert_colors(16)
    assert len(set(colors)) == 16
    worst = min((_delta_e(a, b), i, j) for (i, a), (j, b) in itertools.combinations(enumerate(colors), 2))
    assert worst[0] >= 25, worst  # golden-ratio hues gave 10.8 (E6/E14)
    for bg, fg in zip(colors, text, strict=True):  # the label colour is the more readable of black and white
        assert abs(_lab(bg)[0] - _lab(fg)[0]) >= 35, (bg, fg)


def test_many_experts_still_get_a_colour_each():
    from deepseemoe.report.components import expert_colors

    colors, _ = expert_colors(64)
    assert len(colors) == 64 and len(set(colors)) == 64
