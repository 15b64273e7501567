"""Imports point one way, down the pipeline (the order stated in src/deepseemoe/__init__.py):
a module never imports from a stage above its own, at the top or inside a function.

Independent reference: the import statements themselves, read with `ast` (no import is run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import deepseemoe

SRC = Path(deepseemoe.__file__).parent


def _rank(name: str) -> int:
    for rank, group in enumerate(deepseemoe.STAGES):
        if name in group:
            return rank
    raise AssertionError(f"deepseemoe.{name} is in no stage of deepseemoe.STAGES; add it there")


def _stage(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_import_points_down_the_pipeline():
    backward = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == SRC:
            continue
        mine = _stage(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepseemoe."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("deepseemoe.")]
            else:
                continue
            for name in names:
                theirs = name.split(".")[1]
                if theirs != mine and _rank(theirs) > _rank(mine):
                    backward.append(f"{path.relative_to(SRC)}:{node.lineno} imports {name}")
    assert not backward, "imports against the pipeline:\n" + "\n".join(backward)


def test_the_stage_order():
    # a module of runs/ (the bottom) importing routing/ must be caught by the same rule
    assert _rank("routing") > _rank("runs") and _rank("report") > _rank("compare") > _rank("causal")


# what only runs/ may name: the sub-folders of a dictionary run, the files of its maps and graphs
RUN_FOLDER_PARTS = ("explanations", "maps", "graphs", "steering", "nodes.parquet", "edges.parquet", "analyses",
                    "summary.json", "examples.json", "metrics.jsonl", "ablation.json", "comparison.json",
                    "removal.json", "specialists.json", "table.md")


def test_only_run_classes_build_paths_into_dictionary_runs():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "runs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("map_dir", "graph_dir"):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and side.value in RUN_FOLDER_PARTS:
                        found.append(f"{path.relative_to(SRC)}:{node.lineno} / {side.value!r}")
    assert not found, ("paths into a dictionary run outside runs/ (use DictionaryRun / ExplanationStore): "
                       + ", ".join(found))


def test_old_module_names_import_the_moved_modules_and_warn():
    """Moved modules keep their old names one release for scripts: each old name is the moved module
    itself, with a DeprecationWarning naming where it went; the package's own code never uses them."""
    import importlib
    import sys
    import warnings

    from deepseemoe.moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
        assert not (SRC.parent / (old.replace(".", "/") + ".py")).exists(), f"{old} is still a file"
    users = [f"{p.relative_to(SRC)}: {old}" for p in sorted(SRC.rglob("*.py")) if p.name != "moved.py"
             for old in MOVED if re.search(re.escape(old) + r"\b", p.read_text())]
    assert not users, users


def test_only_run_classes_query_run_tables():
    """DuckDB reads run tables in place; only runs/ may (the explorer asks DictionaryRun.map_rows)."""
    found = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).parts[0] != "runs"
             and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "duckdb" in ast.unparse(n)
                     for n in ast.walk(ast.parse(p.read_text())))]
    assert not found, found
