"""`evaluate`'s `together`: several coders spliced into one forward at once. Known answer by hand:
SAEs whose decoder and bias are zero replace every kept token of their block outputs by zeros, so the
group's spliced loss is the model's with both MoE blocks' outputs zeroed by plain forward hooks."""

from __future__ import annotations

import pytest
import torch
import yaml

from deepseemoe.dictionaries.config import RunSpec
from deepseemoe.dictionaries.evaluate import evaluate_run
from deepseemoe.dictionaries.formats import load_native, save_native
from deepseemoe.dictionaries.training import load_for_run, run_batches
from deepseemoe.runs.dictionary import DictionaryRun


def test_two_zero_saes_spliced_together_equal_both_blocks_zeroed_by_hand(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 10) + "\n")
    cfg = {"model": str(tiny_olmoe_dir), "data": str(docs), "out": str(tmp_path / "run"), "tokens": 512, "ctx_len": 32,
           "train": {"batch_size": 128, "buffer_size": 256},
           "coders": [{"kind": "sae", "site": "block_out", "layers": [la], "k": 4, "n_latents": 32} for la in (0, 1)]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", tmp_path / "run.yaml")
    assert r.code == 0, r.err
    run = DictionaryRun(tmp_path / "run")
    names = ["sae_block_out_0", "sae_block_out_1"]
    for name in names:
        coder, meta = load_native(run.coder_dir(name))
        with torch.no_grad():
            coder.W_dec.zero_()
            coder.b_dec.zero_()
        save_native(coder, run.coder_dir(name), meta)
    doc = evaluate_run(tmp_path / "run", tokens=300, progress=False, benchmarks=False, together={"both": names})
    got = doc["together"]["both"]

    spec = RunSpec.from_run_dir(tmp_path / "run")
    handle = load_for_run(spec, None)
    model = handle.model

    def zero_kept(keep):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            flat = h.reshape(-1, h.shape[-1]).clone()
            flat[keep] = 0
            new = flat.view_as(h)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    clean = hooked = 0.0
    n = crossed = 0
    with torch.no_grad():
        for b in run_batches(spec, handle, batch_size=8, max_tokens=300):
            # predictions counted: both tokens real and of one document (packed contexts hold several)
            valid = b.attention_mask[:, 1:].bool() & b.attention_mask[:, :-1].bool() & (b.doc[:, 1:] == b.doc[:, :-1])
            crossed += int(((b.doc[:, 1:] != b.doc[:, :-1]) & b.attention_mask[:, 1:].bool()
                            & b.attention_mask[:, :-1].bool()).sum())

            def ce(logits, b=b, valid=valid):
                logp = torch.log_softmax(logits[:, :-1].float(), -1)
                return float(-logp.gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)[valid].sum())

            clean += ce(model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits)
            hooks = [model.model.layers[la].mlp.register_forward_hook(zero_kept(b.keep.reshape(-1))) for la in (0, 1)]
            try:
                hooked += ce(model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits)
            finally:
                for h in hooks:
                    h.remove()
            n += int(valid.sum())
    assert crossed > 0  # the contexts hold document boundaries, whose predictions no loss counts
    assert got["next_tokens"] == n
    assert got["ce_clean"] == pytest.approx(clean / n, rel=1e-6)
    assert got["delta_ce"] == pytest.approx((hooked - clean) / n, rel=1e-5)
    assert got["delta_ce"] > 1e-4  # the random tiny MoE writes little, but zeroing two blocks is not nothing
    # not what either SAE alone does (each coder's own splice): the group is both at once
    assert all(abs(doc["coders"][n_]["delta_ce"] - got["delta_ce"]) > 1e-3 * abs(got["delta_ce"]) for n_ in names), \
        [doc["coders"][n_]["delta_ce"] for n_ in names]
