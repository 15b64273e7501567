"""Text sources and packing, checked against hand-built files and the tokenizer's own output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents
from deepseemoe.errors import DeepSeeMoEError
from tests.conftest import build_tokenizer

ROWS = [{"text": "alpha beta gamma", "lang": "en"}, {"text": "x", "lang": "en"},
        {"text": "delta epsilon zeta eta", "lang": "el"}]


def _write_all(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("a whole text file is one document")
    return tmp_path


@pytest.mark.parametrize("name", ["a.jsonl", "b.jsonl.zst", "c.parquet"])
def test_each_format_reads_the_same_records(tmp_path, name):
    _write_all(tmp_path)
    docs = list(iter_documents(TextSource(str(tmp_path / name), domain_field="lang")))
    assert [(d.text, d.domain) for d in docs] == [(r["text"], r["lang"]) for r in ROWS]


def test_folder_glob_filters_limits_and_file_domains(tmp_path):
    _write_all(tmp_path)
    docs = list(iter_documents(TextSource(str(tmp_path), domain_from_file=True, field="text", min_chars=2)))
    assert [d.domain for d in docs] == ["a", "a", "b", "b", "c", "c", "d"]
    assert all(len(d.text) >= 2 for d in docs)
    docs = list(iter_documents(TextSource(str(tmp_path / "*.jsonl*"), max_chars=16, max_docs=2)))
    assert [d.text for d in docs] == ["alpha beta gamma", "x"]
    assert [d.doc_id for d in docs] == [0, 1]


def test_shuffle_is_deterministic(tmp_path):
    _write_all(tmp_path)
    a = [d.source for d in iter_documents(TextSource(str(tmp_path), shuffle=True, seed=3))]
    b = [d.source for d in iter_documents(TextSource(str(tmp_path), shuffle=True, seed=3))]
    assert a == b


def test_hf_streaming_path_on_a_local_dclm_like_shard(tmp_path):
    """The hub path (datasets, streaming) on a local jsonl.zstd shard laid out like DCLM's."""
    shard = tmp_path / "shard_00000000_processed.jsonl.zstd"
    shard.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": r["text"], "url": "u"}) + "\n" for r in ROWS).encode()))
    docs = list(iter_documents(TextSource("hf:json", data_files=str(shard))))
    assert [d.text for d in docs] == [r["text"] for r in ROWS]


def test_bad_inputs_are_one_clear_line(tmp_path):
    _write_all(tmp_path)
    with pytest.raises(DeepSeeMoEError, match="no field 'content'"):
        list(iter_documents(TextSource(str(tmp_path / "a.jsonl"), field="content")))
    with pytest.raises(DeepSeeMoEError, match="does not exist"):
        list(iter_documents(TextSource(str(tmp_path / "missing.jsonl"))))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DeepSeeMoEError, match="is empty"):
        list(iter_documents(TextSource(str(tmp_path / "empty.jsonl"))))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DeepSeeMoEError, match="not valid JSON"):
        list(iter_documents(TextSource(str(tmp_path / "bad.jsonl"))))
    with pytest.raises(DeepSeeMoEError, match="no domain field"):
        list(iter_documents(TextSource(str(tmp_path / "a.jsonl"), domain_field="topic")))


def test_packing_keeps_provenance(tmp_path):
    tok = build_tokenizer(tmp_path)
    _write_all(tmp_path)
    docs = list(iter_documents(TextSource(str(tmp_path / "a.jsonl"))))
    batches = list(pack_documents(tok, docs, ctx_len=6, batch_size=2))
    # reference: the tokenizer's own ids per document, with BOS before each document and context
    expected = {d.doc_id: tok(d.text, add_special_tokens=False)["input_ids"] for d in docs}
    seen: dict[int, list[tuple[int, int]]] = {}
    for b in batches:
        for row in range(b.input_ids.shape[0]):
            real = b.attention_mask[row].bool()
            assert b.input_ids[row, 0] == tok.bos_token_id  # every context starts with BOS
            for tid, doc, pos in zip(b.input_ids[row][real].tolist(), b.doc[row][real].tolist(),
                                     b.pos[row][real].tolist(), strict=True):
                if pos == -1:
                    assert tid == tok.bos_token_id
                else:
                    seen.setdefault(doc, []).append((pos, tid))
    for doc, ids in expected.items():
        assert seen[doc] == list(enumerate(ids))
    assert all(b.input_ids.shape[1] == 6 for b in batches)
    budget = list(pack_documents(tok, docs, ctx_len=6, batch_size=2, max_tokens=5))
    assert sum(b.num_tokens for b in budget) == 5


def test_no_batch_grows_past_batch_size_when_a_context_closes_for_lack_of_room(tmp_path):
    """Regression: a context closed because BOS + one token no longer fit used to skip the
    batch-size check, so one batch swallowed the rest of the corpus."""
    from deepseemoe.data.sources import Document

    tok = build_tokenizer(tmp_path)
    text = "hello world"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    ctx = n + 2  # BOS + the document leaves exactly one free slot: no room for the next BOS + token
    docs = [Document(i, text, None, "x") for i in range(40)]
    batches = list(pack_documents(tok, docs, ctx_len=ctx, batch_size=3))
    assert all(b.input_ids.shape[0] <= 3 for b in batches)
    assert sum(int((b.pos >= 0).sum()) for b in batches) == 40 * n  # nothing lost


def test_interleave_domains_takes_documents_in_turn(tmp_path, monkeypatch):
    import deepseemoe.data.sources as sources

    path = tmp_path / "d.jsonl"
    rows = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("c", 2)]
    path.write_text("".join(json.dumps({"text": f"{d}{i}", "domain": d}) + "\n" for d, i in rows))
    got = list(iter_documents(TextSource(str(path), domain_field="domain", interleave_domains=True)))
    assert [d.text for d in got] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert [d.doc_id for d in got] == list(range(6))  # numbered in the order they come
    # windows bound the memory: each window is interleaved on its own, in order
    monkeypatch.setattr(sources, "INTERLEAVE_WINDOW", 4)
    got = list(iter_documents(TextSource(str(path), domain_field="domain", interleave_domains=True)))
    assert [d.text for d in got] == ["a1", "b1", "a2", "a3", "c1", "c2"]
    assert [d.text for d in iter_documents(TextSource(str(path), domain_field="domain"))] == [f"{d}{i}" for d, i in rows]
