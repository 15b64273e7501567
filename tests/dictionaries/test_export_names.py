"""Exports name what the other tools hook: sparsify hooks a module's *output* (its hookpoint), SAELens
records the Hugging Face module whose output the SAE reads; no two coders share an export slot.

Independent reference: forward hooks on the named modules of the Hugging Face model (not our
capture code), compared with our sites; sparsify's and SAELens' own loaders read the files."""

from __future__ import annotations

import json
from importlib.metadata import version

import torch
import yaml

from deepseemoe.capture.consumers import ActivationCollector
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.models.load import load_model
from tests.faults.conftest import assert_refused

SITES = ("resid_in", "resid_out", "block_in", "block_out")


def _config(tiny_olmoe_dir, corpus_jsonl, out, coders, formats):
    return {"model": str(tiny_olmoe_dir), "data": str(corpus_jsonl), "out": str(out), "tokens": 256, "ctx_len": 32,
            "formats": formats, "coders": coders, "train": {"batch_size": 64, "buffer_size": 128}}


def test_sparsify_hookpoints_are_the_modules_whose_output_each_sae_reads(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    from sparsify import SparseCoder

    coders = [{"kind": "sae", "site": s, "layers": [1], "k": 4, "expansion_factor": 2, "name": s} for s in SITES]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tiny_olmoe_dir, corpus_jsonl, tmp_path / "run", coders,
                                                            ["sparsify", "saelens"])))
    assert cli("train", tmp_path / "c.yaml").code == 0
    root = tmp_path / "run" / "exports" / "sparsify"
    points = sorted(str(p.parent.relative_to(root)) for p in root.rglob("cfg.json"))
    assert points == ["layers.0", "layers.1", "layers.1.mlp", "layers.1.post_attention_layernorm"]  # four, not two

    handle = load_model(str(tiny_olmoe_dir))
    ids = handle.tokenizer(["the king said unto his servants"], return_tensors="pt").input_ids
    outputs = {}

    def keep(point):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            outputs[point] = out.reshape(-1, out.shape[-1])
        return hook

    hooks = [handle.model.get_submodule(f"model.{p}").register_forward_hook(keep(p)) for p in points]
    collector = ActivationCollector([Site(s, 1) for s in SITES])
    run_capture(handle, ids, [collector], exclude_bos=False, stop_early=False)
    for h in hooks:
        h.remove()
    expect = {"layers.0": "resid_in", "layers.1": "resid_out", "layers.1.post_attention_layernorm": "block_in",
              "layers.1.mlp": "block_out"}
    for point, site in expect.items():
        ours = collector.chunks[Site(site, 1)][0]
        torch.testing.assert_close(outputs[point].float(), ours.float())  # the hookpoint's output is the site
        SparseCoder.load_from_disk(root / point)  # and sparsify reads the folder
    for site in SITES:  # SAELens: the module whose output the SAE reads, distinct for _in and _out
        meta = json.loads((tmp_path / "run" / "exports" / "saelens" / site / "cfg.json").read_text())["metadata"]
        hf = {"resid_in": "model.layers.0", "resid_out": "model.layers.1", "block_in":
              "model.layers.1.post_attention_layernorm", "block_out": "model.layers.1.mlp"}[site]
        assert meta["hf_hook_name"] == hf
        assert meta["sae_lens_version"] == version("sae-lens")
        assert meta["model_name"] == ""  # a local folder is no hub id


def test_two_coders_on_one_sparsify_hookpoint_are_refused_before_training(cli, tiny_olmoe_dir, corpus_jsonl,
                                                                          tmp_path):
    # resid_in of layer 1 is the output of layer 0: the same hookpoint as resid_out of layer 0
    coders = [{"kind": "sae", "site": "resid_in", "layers": [1], "k": 4, "name": "a"},
              {"kind": "sae", "site": "resid_out", "layers": [0], "k": 4, "name": "b"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tiny_olmoe_dir, corpus_jsonl, tmp_path / "run", coders,
                                                            ["sparsify"])))
    assert_refused(cli("train", tmp_path / "c.yaml"), "a, b", "layers.0")
    assert not (tmp_path / "run" / "dictionaries").exists()


def test_an_ambiguous_circuit_tracer_set_is_not_written(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    coders = [{"kind": "transcoder", "layers": [0], "activation": "relu", "name": "plain0"},
              {"kind": "skip_transcoder", "layers": [1], "activation": "relu", "name": "skip1"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tiny_olmoe_dir, corpus_jsonl, tmp_path / "run", coders,
                                                            ["circuit_tracer"])))
    result = cli("train", tmp_path / "c.yaml")
    assert result.code == 0 and "mix skip and plain" in result.out
    assert not (tmp_path / "run" / "exports" / "circuit_tracer" / "transcoder_set").exists()
