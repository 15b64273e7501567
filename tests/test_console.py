"""What a user sees in a terminal or a pipe: our bars only, full rows when piped, plain help."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISABLE_PROGRESS_BARS")}
    return subprocess.run([sys.executable, "-m", "deepseemoe.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_no_other_librarys_bars_when_a_model_loads(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    r = _run("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "r", "--max-tokens", "200")
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr + r.stdout and "it/s]" not in r.stderr


def test_help_names_arguments_and_shows_no_python_types():
    import re

    for verb in (["route"], ["wiring"], ["train"], ["zoo"], ["explain"]):
        r = _run(*verb, "--help")
        assert r.returncode == 0, r.stderr
        assert "<bool>" not in r.stdout and not re.search(r"<list\[|\{[a-z_]+\}", r.stdout), r.stdout
    assert "Usage: deepseemoe route [OPTIONS] MODEL" in _run("route", "--help").stdout
    assert "MODELS..." in _run("wiring", "--help").stdout


def test_piped_tables_are_not_cut_at_80_columns(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    r = _run("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "r", "--max-tokens", "300")
    assert r.returncode == 0, r.stderr
    r = _run("stats", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) > 80 and "→ next NMI" in r.stdout  # the whole header on one line
    assert "…" not in r.stdout and "nan" not in r.stdout
