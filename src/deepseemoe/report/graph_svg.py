"""A pruned attribution graph (circuit-tracer's graph JSON, as `attribute` writes it) drawn as one SVG,
for the report (static) and the explorer (nodes link to their pages).

Layout: one column per prompt position (the tokens along the bottom), rows from the bottom up —
tokens, then for each layer three bands: what enters the block (dictionary features and error
nodes), the routing decisions, what the block wrote (experts, a shared expert, a frozen MLP) — and
the candidate next tokens on top. The routing band sits between the features that decide it and
the experts that act. Edges are lines, blue when the source raises the target and red when it
lowers it, as thick as the edge's share of the largest |weight|; gate links (router → its expert)
are dashed. Hovering a node shows what it is (the feature's description when `explain` wrote one).
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Callable

from markupsafe import Markup

from deepseemoe.report.components import show_token

# band of each node kind inside its layer (0: block input, 1: routing, 2: block output)
_BAND = {"cross layer transcoder": 0, "mlp reconstruction error": 0, "moe router": 1, "moe expert": 2,
         "moe shared expert": 2, "frozen mlp": 2}
_COLOR = {"embedding": "#9e9e9e", "cross layer transcoder": "#2e7d32", "mlp reconstruction error": "#bdbdbd",
          "moe router": "#ef6c00", "moe expert": "#1565c0", "moe shared expert": "#6a1b9a", "frozen mlp": "#795548",
          "logit": "#c62828"}
# (what a reader calls it, its colour), for the legend beside a drawing
LEGEND = tuple((name, _COLOR[kind]) for name, kind in (
    ("token", "embedding"), ("feature", "cross layer transcoder"), ("error", "mlp reconstruction error"),
    ("routing decision ◇", "moe router"), ("expert output ▫", "moe expert"), ("shared expert", "moe shared expert"),
    ("next token", "logit")))


# edges under this share of the largest |weight| are left out of the drawing (kept in the file): the
# faint fan of token → last-position edges through attention would cover the paths that matter
MIN_DRAWN = 0.02


def parse_node(node: dict) -> dict:
    """A node's kind, layer, position and index (feature, expert or token id) from its circuit-tracer id."""
    nid, ftype = node["node_id"], node["feature_type"]
    parts = nid.lstrip("ERXSM").split("_")
    if ftype == "embedding":
        return {"kind": "token", "layer": -1, "pos": int(parts[-1]), "index": int(parts[-2])}
    if ftype == "logit":
        return {"kind": "logit", "layer": int(parts[0]), "pos": int(parts[-1]), "index": int(parts[1])}
    kind = {"cross layer transcoder": "feature", "mlp reconstruction error": "error", "moe router": "router",
            "moe expert": "expert", "moe shared expert": "shared", "frozen mlp": "mlp"}[ftype]
    if kind == "error":  # "0_{layer}_{pos}"
        return {"kind": kind, "layer": int(parts[1]), "pos": int(parts[2]), "index": -1}
    if kind in ("shared", "mlp"):
        return {"kind": kind, "layer": int(parts[0]), "pos": int(parts[1]), "index": -1}
    if kind == "feature":  # the dictionary's latent number (a CLT's ids number features within their layer)
        return {"kind": kind, "layer": int(parts[0]), "pos": int(parts[2]), "index": int(node.get("latent", parts[1])),
                "dictionary": node.get("dictionary")}
    return {"kind": kind, "layer": int(parts[0]), "pos": int(parts[2]), "index": int(parts[1])}


def _title(node: dict, where: dict, tokens: list[str]) -> str:
    tok = show_token(tokens[where["pos"]]) if 0 <= where["pos"] < len(tokens) else ""
    k = where["kind"]
    if k == "token":
        return f"token {tok!r} (position {where['pos']})"
    if k == "feature":
        text = f"L{where['layer']} feature {where['index']} of {node.get('dictionary', '')} at {tok!r}, activation " \
               f"{node.get('activation') or 0:.3g}"
        return text + (f"\n{node['clerp']}" if node.get("clerp") else "\n(no description)")
    if k == "error":
        return f"L{where['layer']} error of {node.get('dictionary', '')} at {tok!r}: what it does not explain"
    return node.get("clerp") or f"{k} L{where['layer']} at {tok!r}"


def graph_svg(doc: dict, *, href: Callable[[dict], str | None] | None = None, width: int = 1100) -> Markup:
    """The graph as an inline SVG; `href(parsed node)` gives a node's link (the explorer), or None."""
    tokens = doc["metadata"]["prompt_tokens"]
    nodes = doc["nodes"]
    parsed = {n["node_id"]: parse_node(n) for n in nodes}
    layers = sorted({p["layer"] for p in parsed.values() if p["kind"] not in ("token", "logit")})
    # rows bottom-up: tokens, each layer's three bands (only those with nodes), logits
    rows: list[tuple] = [("token",)]
    for layer in layers:
        for band in range(3):
            if any(p["layer"] == layer and _BAND.get(n["feature_type"]) == band
                   for n in nodes for p in [parsed[n["node_id"]]] if p["kind"] not in ("token", "logit")):
                rows.append((layer, band))
    rows.append(("logit",))

    def row_of(n: dict) -> int:
        p = parsed[n["node_id"]]
        if p["kind"] in ("token", "logit"):
            return rows.index((p["kind"],))
        return rows.index((p["layer"], _BAND[n["feature_type"]]))

    S = max(len(tokens), 1)
    col_w = max(width / S, 24.0)
    row_h, top, bottom, left = 46, 24, 70, 100  # the band labels sit in the left margin
    height = top + row_h * (len(rows) - 1) + bottom
    cells = defaultdict(list)
    for n in nodes:
        cells[(row_of(n), parsed[n["node_id"]]["pos"])].append(n)
    xy, crowded = {}, set()
    logit_row = len(rows) - 1
    for (r, pos), members in cells.items():
        members.sort(key=lambda n: -(n.get("influence") or 0.0))
        step = min(14.0, (col_w - 8) / max(len(members), 1))
        for i, n in enumerate(members):
            if r == logit_row:  # the candidate next tokens, most influential rightmost, spaced for their labels
                x = left + col_w * (pos + 0.5) - 56 * i
            else:
                x = left + col_w * (pos + 0.5) + (i - (len(members) - 1) / 2) * step
            xy[n["node_id"]] = (x, top + row_h * (len(rows) - 1 - r))
            if step < 12 and r != logit_row:
                crowded.add(n["node_id"])
    out = [f'<svg class="attribution-graph" viewBox="0 0 {left + col_w * S:.0f} {height}" width="100%" '
           f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="attribution graph">']
    for i, row in enumerate(rows):  # band labels on the left
        y = top + row_h * (len(rows) - 1 - i)
        label = {"token": "tokens", "logit": "next token"}.get(row[0]) if len(row) == 1 else \
            f"L{row[0]} " + ("block input", "routing", "block output")[row[1]]
        out.append(f'<line x1="{left}" x2="{left + col_w * S:.0f}" y1="{y}" y2="{y}" stroke="#eee"/>'
                   f'<text x="2" y="{y + 3}" font-size="9" fill="#888">{html.escape(label)}</text>')
    links = doc["links"]
    biggest = max((abs(link["weight"]) for link in links if link.get("kind") != "gate"), default=1.0) or 1.0
    for link in sorted(links, key=lambda lk: abs(lk["weight"])):
        if link["source"] not in xy or link["target"] not in xy:
            continue
        if link.get("kind") != "gate" and abs(link["weight"]) < MIN_DRAWN * biggest:
            continue
        (x1, y1), (x2, y2) = xy[link["source"]], xy[link["target"]]
        if link.get("kind") == "gate":
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#ef6c00" '
                       'stroke-width="1.5" stroke-dasharray="3 2"/>')
            continue
        share = abs(link["weight"]) / biggest
        color = "#1f77b4" if link["weight"] > 0 else "#d62728"
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
                   f'stroke-opacity="{0.15 + 0.7 * share:.2f}" stroke-width="{0.5 + 3 * share:.2f}"/>')
    for n in nodes:
        x, y = xy[n["node_id"]]
        p = parsed[n["node_id"]]
        color = _COLOR[n["feature_type"]]
        title = html.escape(_title(n, p, tokens))
        if p["kind"] == "router":  # a decision a small push flips (margin under one logit) is drawn hollow
            fill = "white" if abs(n.get("margin", 99.0)) < 1.0 else color
            shape = (f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" transform="rotate(45 {x:.1f} {y:.1f})" '
                     f'fill="{fill}" stroke="{color}" stroke-width="1.5"/>')
        elif p["kind"] in ("expert", "shared", "mlp"):
            shape = f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{color}"/>'
        elif p["kind"] == "logit":
            shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{6 if n.get("is_target_logit") else 4}" fill="{color}"/>'
        else:
            shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'
        label = ""
        if p["kind"] in ("router", "expert") and n["node_id"] not in crowded:
            label = f'<text x="{x:.1f}" y="{y - 7:.1f}" font-size="8" text-anchor="middle">E{p["index"]}</text>'
        elif p["kind"] == "logit":
            label = (f'<text x="{x:.1f}" y="{y - 9:.1f}" font-size="10" text-anchor="middle">'
                     f'{html.escape(show_token(n.get("token", "")))}</text>')
        group = f'<g class="node node-{p["kind"]}"><title>{title}</title>{shape}{label}</g>'
        link = href(p) if href is not None else None
        out.append(f'<a href="{html.escape(link)}">{group}</a>' if link else group)
    base = top + row_h * (len(rows) - 1) + 16
    for pos, t in enumerate(tokens):  # the prompt along the bottom, turned so long tokens fit
        x = left + col_w * (pos + 0.5)
        out.append(f'<text x="{x:.1f}" y="{base}" font-size="10" text-anchor="end" '
                   f'transform="rotate(-45 {x:.1f} {base})">{html.escape(show_token(t))}</text>')
    out.append("</svg>")
    return Markup("".join(out))
