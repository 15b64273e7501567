"""Helpers for the fault-injection suite: one-line refusals and a finished training run to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml


def assert_refused(result, *words: str) -> None:
    """Exit 2, exactly one `error:` line that contains `words`, and no traceback."""
    assert result.code == 2, (result.code, result.out[-2000:], result.err[-2000:])
    assert len(result.error_lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    for w in words:
        assert w.lower() in result.error_lines[0].lower(), (w, result.error_lines[0])


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_olmoe_dir, corpus_jsonl) -> Path:
    """A finished training run (one TopK SAE) on the tiny OLMoE; tests copy it before damaging it."""
    from typer.testing import CliRunner

    from deepseemoe.cli import app

    root = tmp_path_factory.mktemp("small_run")
    corpus = root / "docs.jsonl"
    corpus.write_text(corpus_jsonl.read_text() * 40)  # enough text for the steps a resume adds
    config = {"model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(root / "run"),
              "tokens": 512, "ctx_len": 32, "batch_size": 4, "checkpoint_every": 1,
              "coders": [{"kind": "sae", "layers": [1], "site": "block_in", "k": 4, "expansion_factor": 2}],
              "train": {"batch_size": 128, "buffer_size": 256}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(root / "run.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def run_copy(small_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(small_run, dst)
    return dst
