"""`deepseemoe route` end to end on a tiny OLMoE saved with save_pretrained and a local jsonl corpus.

Reference: Hugging Face's own `output_router_logits` for the same contexts, with OLMoE's
router math (softmax → top-k, no renormalisation) applied by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents


def test_route_cli_writes_the_documented_store(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepseemoe.cli", "route", str(tiny_olmoe_dir), "--data", str(corpus_jsonl),
           "--out", str(out), "--domain-field", "domain", "--ctx-len", "16", "--batch-size", "2", "--logits"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "run.json").read_text())
    tokens = pq.read_table(out / "tokens").to_pandas()
    routing = pq.read_table(out / "routing")
    assert meta["tokens"] == len(tokens)
    assert str(routing.schema.field("layer").type) == "int16" and str(routing.schema.field("rank").type) == "int8"
    assert str(routing.schema.field("expert").type) == "int16" and str(routing.schema.field("weight").type) == "float"
    assert set(tokens["domain"]) == {"en", "code", "de"}
    routing = routing.to_pandas()
    assert len(routing) == len(tokens) * 2 * 2  # 2 MoE layers × top-2

    # Independent reference: HF forward with output_router_logits on the same packed contexts.
    tok = AutoTokenizer.from_pretrained(tiny_olmoe_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_olmoe_dir).eval()
    docs = iter_documents(TextSource(str(corpus_jsonl), domain_field="domain"))
    expected = {}
    for packed in pack_documents(tok, docs, ctx_len=16, batch_size=2):
        with torch.no_grad():
            hf = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, output_router_logits=True)
        keep = (packed.attention_mask.bool() & (packed.input_ids != tok.bos_token_id)).reshape(-1)
        for layer, logits in enumerate(hf.router_logits):
            w, idx = torch.softmax(logits.float(), -1)[keep].topk(2, dim=-1)
            for d, p, e_row, w_row in zip(packed.doc.reshape(-1)[keep].tolist(), packed.pos.reshape(-1)[keep].tolist(),
                                          idx.tolist(), w.tolist(), strict=True):
                expected[(d, p, layer)] = (e_row, w_row)
    assert len(expected) == len(tokens) * 2
    for row in duckdb.sql("SELECT doc, pos, layer, list(expert ORDER BY rank), list(weight ORDER BY rank) "
                          "FROM routing GROUP BY ALL").fetchall():
        e_ref, w_ref = expected[(row[0], row[1], row[2])]
        assert row[3] == e_ref
        np.testing.assert_allclose(row[4], w_ref, rtol=1e-5)
    logits = pq.read_table(out / "logits").to_pandas()
    assert len(logits) == len(tokens) * 2 and len(logits["logits"].iloc[0]) == 8


def test_route_cli_bad_input_is_one_line(tiny_olmoe_dir, tmp_path):
    cmd = [sys.executable, "-m", "deepseemoe.cli", "route", str(tiny_olmoe_dir), "--data", str(tmp_path / "nope.jsonl"),
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert not (tmp_path / "run" / "run.json").exists()


def test_statistics_of_a_run_do_not_depend_on_its_shards(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    """The same routing in one shard and in shards of ~40 tokens (boundaries inside documents):
    identical statistics; the consecutive pairs equal DuckDB's self-join of the tokens on (doc, pos + 1)."""
    from deepseemoe.routing.stats import compute_routing_stats

    stats = {}
    for name, extra in (("whole", []), ("cut", ["--shard-tokens", "40"])):
        cmd = [sys.executable, "-m", "deepseemoe.cli", "route", str(tiny_olmoe_dir), "--data", str(corpus_jsonl),
               "--out", str(tmp_path / name), "--domain-field", "domain", "--ctx-len", "16", "--batch-size", "2",
               *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        stats[name] = compute_routing_stats(tmp_path / name)
    assert len(list((tmp_path / "cut" / "tokens").glob("*.parquet"))) > 2
    pairs = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path / 'cut' / 'tokens'}/*.parquet') a "
                       f"JOIN read_parquet('{tmp_path / 'cut' / 'tokens'}/*.parquet') b "
                       "ON a.doc = b.doc AND b.pos = a.pos + 1").fetchall()[0][0]
    for layer in ("0", "1"):
        assert stats["cut"].summary["layers"][layer]["repetition"]["pairs"] == pairs
    assert stats["cut"].summary["layers"] == stats["whole"].summary["layers"]
