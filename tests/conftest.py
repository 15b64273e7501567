"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny OLMoE saved like a hub model."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=UserWarning)


def _let_circuit_tracer_import() -> None:
    """circuit-tracer 0.5.0 (pinned to transformers ≤ 4.57, installed --no-deps) imports
    `huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER`, which huggingface_hub 1.0 removed with
    hf_transfer itself; the flag only chose a download backend. Restore it as off, so that
    circuit-tracer's own unmodified code (ReplacementModel included) imports in our environment."""
    import huggingface_hub.constants as hub_constants

    if not hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
        hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False


_let_circuit_tracer_import()

SAMPLE_TEXTS = {
    "en": ["The king said unto his servants, go forth and gather the harvest before the rain.",
           "A quick brown fox jumps over the lazy dog while the farmer sleeps in the barn."],
    "code": ["def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
             "for i in range(10):\n    print(i * i)\nimport os\nos.path.join('a', 'b')\n"],
    "de": ["Der schnelle braune Fuchs springt über den faulen Hund und die Katze schläft.",
           "Es war einmal ein König, der hatte drei Töchter und ein großes Schloss am See."],
}


def build_tokenizer(folder: Path, vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [t for texts in SAMPLE_TEXTS.values() for t in texts] * 20
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def tiny_olmoe_dir(tmp_path_factory) -> Path:
    """A tiny random OLMoE + tokenizer saved with save_pretrained (loads like a hub model)."""
    from deepseemoe.models.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny_olmoe")
    tok = build_tokenizer(folder)
    model = tiny_model("olmoe", vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for domain, texts in SAMPLE_TEXTS.items():
            for text in texts:
                f.write(json.dumps({"text": text, "domain": domain}) + "\n")
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `deepseemoe ARGS…` through `deepseemoe.cli.run` (the console script's function), so exit
    codes and the one-line error handling are the user's. An exception escaping it fails the test."""
    from deepseemoe.cli import run

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["deepseemoe", *map(str, args)])
        try:
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
