"""A small study for the explorer: the reduced demo (tiny OLMoE and dense twin trained here, routing,
statistics, dictionaries with maps, causal checks, comparison, descriptions by an oracle)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TEXT = "def add(a, b):\n    return a + b\n# the king said unto his servants"


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    from deepseemoe.demo import run_demo
    from deepseemoe.explain.backends import OpenAIChat
    from tests.explain.stub_server import Stub

    root = tmp_path_factory.mktemp("explore")
    with Stub() as stub:
        run_demo(root / "demo", recipe="tiny", cache_dir=root / "cache", max_tokens=3000,
                 explainer=OpenAIChat(stub.url, "oracle"))
    return root / "demo"


def strip_cells(html: str, strip_id: str) -> dict[int, list[list[int]]]:
    """{layer: [token][experts]} from a routing strip's data attributes (components.html.j2)."""
    start = html.index(f'id="{strip_id}"')
    part = html[start:html.index("</table>", start)]
    out: dict[int, list[list[int]]] = {}
    for layer, token, experts in re.findall(r'data-layer="(\d+)" data-token="(\d+)" data-experts="([\d,]+)"', part):
        row = out.setdefault(int(layer), [])
        assert int(token) == len(row)
        row.append([int(e) for e in experts.split(",")])
    return out


def busiest_expert(study: Path, layer: int) -> int:
    """The expert of `layer` with the most routing slots, counted from the routing parquet."""
    import duckdb

    return duckdb.sql(f"SELECT expert FROM read_parquet('{study}/run/routing/*.parquet') WHERE layer = {layer} "
                      "GROUP BY expert ORDER BY count(*) DESC, expert LIMIT 1").fetchall()[0][0]
