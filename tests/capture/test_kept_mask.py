"""One kept-token mask: the packer's provenance (pos ≥ 0 on real tokens), never a comparison of
token ids with a BOS id. A tokenizer without BOS whose model config has one, reading text that
spells that token, is where the two disagree: every reader must keep the same tokens.

Independent reference: the tokenizer's own ids of each document, counted here."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from deepseemoe.capture.consumers import ActivationCollector
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents
from deepseemoe.models.load import load_model


def test_tokens_spelling_bos_are_kept_everywhere(tiny_olmoe_dir, tmp_path, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_olmoe_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    bos_id = tok.bos_token_id
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["bos_token"] = None  # the tokenizer has no BOS; the model config still says bos_token_id=1
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    handle = load_model(str(model))
    assert handle.tokenizer.bos_token_id is None and handle.model.config.bos_token_id == bos_id
    data = tmp_path / "docs.jsonl"
    texts = ["the king <s> said", "<s> go forth and gather the harvest"]  # "<s>" tokenizes to the BOS id
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert sum(tok(t, add_special_tokens=False)["input_ids"].count(bos_id) for t in texts) == 2

    (packed,) = pack_documents(handle.tokenizer, iter_documents(TextSource(str(data))), ctx_len=32, batch_size=4)
    assert int(packed.keep.sum()) == expected
    collector = ActivationCollector([Site("block_in", 0)])
    batch = run_capture(handle, packed.input_ids, [collector], attention_mask=packed.attention_mask,
                        keep=packed.keep)
    assert torch.equal(batch.mask, packed.keep) and collector.chunks[Site("block_in", 0)][0].shape[0] == expected

    assert cli("route", model, "--data", data, "--out", tmp_path / "run", "--ctx-len", "32").code == 0
    tokens = pq.read_table(tmp_path / "run" / "tokens").to_pandas()
    assert len(tokens) == expected and (tokens["token_id"] == bos_id).sum() == 2
