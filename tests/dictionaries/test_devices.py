"""The model on one device and the coders on another (`model_device` / `coder_device`, the plan's
cuda:0 / cuda:1 split): the activations cross over and training ends with the same weights as
with everything on one device. On this machine the two devices are `cpu` and `cpu:0`, which torch
treats as different devices (every activation goes through `.to(coder_device)`); a GPU machine
runs the same YAML with cuda:0 / cuda:1."""

from __future__ import annotations

import torch
import yaml

from deepseemoe.dictionaries.formats import load_native


def test_coders_on_another_device_train_to_the_same_weights(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    assert torch.device("cpu") != torch.device("cpu:0")  # two devices to torch, one memory here
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 10) + "\n")
    runs = {}
    for name, devices in (("one", {}), ("split", {"model_device": "cpu", "coder_device": "cpu:0"})):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(tmp_path / name), "ctx_len": 32,
            "tokens": 512, **devices,
            "coders": [{"kind": "transcoder", "layers": [1], "k": 4, "expansion_factor": 2, "name": "tc"},
                       {"kind": "router_transcoder", "layers": [1], "k": 4, "expansion_factor": 2, "name": "rt"}],
            "train": {"batch_size": 64, "buffer_size": 128, "lr": 3e-3}}))
        result = cli("train", config)
        assert result.code == 0, result.err
        runs[name] = tmp_path / name
    for coder in ("tc", "rt"):
        a, meta = load_native(runs["one"] / "dictionaries" / coder)
        b, _ = load_native(runs["split"] / "dictionaries" / coder)
        assert meta["steps"] > 0
        for (key, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=f"{coder}.{key}")
