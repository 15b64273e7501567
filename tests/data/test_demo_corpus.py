"""The demo corpus builder on a fake tree of source files, and its text cleaners on hand-written input."""

from __future__ import annotations

import json

from deepseemoe.data import demo_corpus
from deepseemoe.data.demo_corpus import build_corpus, chunk_text, split_fortunes, stdlib_code


def test_split_fortunes_and_chunking():
    text = "First quote that is long enough to keep.\n%\nshort\n%\n\x1b[1mSecond quote, also long enough to be kept.\x1b[0m\n%\n"
    assert split_fortunes(text) == ["First quote that is long enough to keep.", "Second quote, also long enough to be kept."]
    paras = "\n\n".join(f"paragraph {i} " + "x" * 90 for i in range(10))
    docs = chunk_text(paras, size=250)
    assert all(len(d) >= 80 for d in docs) and "".join(docs).count("paragraph") == 10


def test_stdlib_code_skips_tests(tmp_path):
    (tmp_path / "mod.py").write_text("def f():\n    return 1\n" * 10)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text("def test():\n    assert True\n" * 10)
    docs = list(stdlib_code(tmp_path))
    assert docs and all("assert" not in d for d in docs)


def _fake_sources(tmp_path):
    return {
        "code": [("py", lambda: [f"def f{i}():\n    return {i}\n" * 5 for i in range(30)])],
        "en": [("quotes", lambda: [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(30)]),
               ("dupes", lambda: ["The quick brown fox number 1 jumps over the lazy dog."] * 5)],
        "de": [("missing", lambda: [])],
    }


def test_build_corpus_labels_dedup_split_determinism(tmp_path):
    a = build_corpus(tmp_path / "a", seed=1, sources=_fake_sources(tmp_path), val_fraction=0.1)
    b = build_corpus(tmp_path / "b", seed=1, sources=_fake_sources(tmp_path), val_fraction=0.1)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "a" / "val.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows + val]
    assert len(texts) == len(set(texts)) == 60  # the 5 duplicates were dropped
    assert {r["domain"] for r in rows} == {"code", "en"}
    assert a.domains["en"]["val_docs"] == 3 and a.domains["code"]["val_docs"] == 3
    assert a.missing == ["de"] and "de" in a.notes[0]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["missing"] == ["de"]
    assert b.domains == a.domains


def test_real_sources_on_this_machine(tmp_path):
    """Whatever this machine has: the stdlib always gives the code domain."""
    report = build_corpus(tmp_path, max_bytes_per_domain=30_000)
    assert "code" in report.domains
    for domain in set(demo_corpus.DOMAINS) - set(report.domains):
        assert domain in report.missing
