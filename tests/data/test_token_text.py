"""Token texts, not tokenizer symbols: Cyrillic, accented Latin, CJK and emoji through a byte-level
BPE and a SentencePiece tokenizer, into the routing store and the report.

Independent reference: the tokenizer's own `decode`, incrementally (the text token i adds to the
decoded prefix), wherever that text is whole characters; where a token ends mid-character the
reference is the UTF-8 bytes of the document itself."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

from deepseemoe.data.token_text import token_texts

TEXTS = ["también está el café", "привет мир, как дела у тебя", "東京タワーと富士山", "party 🎉 time 🚀 now"]


def _trained(model, min_frequency: int):
    model.train_from_iterator(TEXTS * 5, vocab_size=300, min_frequency=min_frequency,
                              special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=model._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _byte_level():
    return _trained(ByteLevelBPETokenizer(), min_frequency=2)


def _sentencepiece():
    return _trained(SentencePieceBPETokenizer(), min_frequency=1)


def _unescape(text: str) -> bytes:
    """Our text back to bytes: \\xNN escapes stand for the bytes of a cut character."""
    out, i = bytearray(), 0
    while i < len(text):
        if text.startswith("\\x", i):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out += text[i].encode()
            i += 1
    return bytes(out)


@pytest.mark.parametrize("make", [_byte_level, _sentencepiece])
def test_token_texts_spell_the_document(make):
    tok = make()
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        ours = token_texts(tok, ids)
        assert b"".join(_unescape(t) for t in ours).decode().strip() == text  # every byte, in order
        assert not any(ch in "".join(ours) for ch in "ĠÃÐÑæðŁ▁\ufffd")  # no symbols, no mojibake
        for i in range(1, len(ids)):  # where decode gives whole characters, ours is the same text
            added = tok.decode(ids[: i + 1])[len(tok.decode(ids[:i])):]
            if "\ufffd" not in tok.decode(ids[: i + 1]) + tok.decode(ids[:i]):
                assert ours[i] == added, (text, i)


def test_the_store_holds_texts_and_symbols_and_the_report_shows_texts(tmp_path, cli):
    from deepseemoe.models.tiny import tiny_model

    folder = tmp_path / "model"
    tok = _byte_level()
    tok.save_pretrained(folder)
    model = tiny_model("olmoe", vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model.save_pretrained(folder)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": f"d{i}"}) + "\n" for i, t in enumerate(TEXTS)))
    assert cli("route", folder, "--data", data, "--out", tmp_path / "study" / "run", "--ctx-len", "64",
               "--domain-field", "domain").code == 0
    tokens = pq.read_table(tmp_path / "study" / "run" / "tokens").to_pandas()
    ru = tokens[tokens["domain"] == "d1"]
    assert b"".join(_unescape(t) for t in ru["token"]).decode().strip() == TEXTS[1]
    assert ru["piece"].tolist() == tok.convert_ids_to_tokens(ru["token_id"].tolist())  # the raw symbol, kept
    assert cli("stats", tmp_path / "study" / "run", "--no-figures").code == 0
    assert cli("report", tmp_path / "study" / "run").code == 0
    page = (tmp_path / "study" / "report" / "index.html").read_text()
    shown = set(re.findall(r"[\u0400-\u04ff]", page))  # Cyrillic letters in the routing view
    whole = {ch for t in ru["token"] if "\\x" not in t for ch in t if "\u0400" <= ch <= "\u04ff"}
    assert whole and whole <= shown and "Ð" not in page and "Ã" not in page
    # characters cut across tokens (CJK, emoji: 3–4 bytes) are shown whole, never as \xNN escapes
    assert any("\\x" in t for t in tokens["token"])  # the tokenizer does cut some
    for text in TEXTS:
        assert all(ch in page for ch in text if not ch.isspace()), text
    assert not re.search(r"\\x[89a-f][0-9a-f]", page)


def test_joined_texts_by_hand():
    from deepseemoe.data.token_text import joined_texts

    # "Ы" = d0 ab, "Ш" = d0 a8, "‴" = e2 80 b4: each shown once, in the token holding its last byte
    texts = [" В", "\\xd0", "\\xab\\xd0", "\\xa8", " ok", "\\xe2\\x80", "\\xb4"]
    assert joined_texts(texts) == [" В", "", "Ы", "Ш", " ok", "", "‴"]
    # a framed token (a context's centre) shows every character it holds a byte of
    assert joined_texts(texts, frame=1) == [" В", "Ы", "", "Ш", " ok", "", "‴"]
    assert joined_texts(texts, frame=3) == [" В", "", "Ы", "Ш", " ok", "", "‴"]
    # bytes that complete no character stay escaped; literal backslashes in code are text
    assert joined_texts(["a\\xd0"]) == ["a\\xd0"] and joined_texts(["'\\x41'"]) == ["'\\x41'"]
    assert joined_texts(["plain", " text"]) == ["plain", " text"]
