"""CLTs with a limited reach (`neighbours`: a feature of layer i writes to layers i..i+w only): the
decode is the hand-computed sum over the allowed slices, the other slices start at zero and stay
exactly zero through training, w = 0 is a per-layer transcoder set, and through the CLI two CLTs of
other reach train side by side under their own names with the layer spread their reach allows."""

from __future__ import annotations

import json

import pytest
import torch
import yaml


def _clt(S=4, D=6, Fl=5, neighbours=1, k=2):
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder

    torch.manual_seed(0)
    return build_coder(CoderConfig(d_in=S * D, d_out=S * D, n_latents=S * Fl, n_sites=S, cross_layer=True,
                                   activation="topk", k=k, neighbours=neighbours))


@pytest.mark.parametrize("w", [0, 1, 2])
def test_decode_uses_only_the_allowed_slices_and_the_rest_stays_zero(w):
    S, D, Fl = 4, 6, 5
    clt = _clt(S, D, Fl, neighbours=w)
    for i, dec in enumerate(clt.W_dec):
        assert torch.all(dec[:, w + 1:] == 0) and torch.any(dec[:, :w + 1] != 0), i
    lat = torch.relu(torch.randn(7, S * Fl))
    want = torch.zeros(7, S * D)
    for i in range(S):
        for j in range(i, min(S, i + w + 1)):  # by hand: layer i's latents into layer j
            want[:, j * D:(j + 1) * D] += lat[:, i * Fl:(i + 1) * Fl] @ clt.W_dec[i][:, j - i]
    torch.testing.assert_close(clt.decode_latents(lat), want)
    # a few optimizer steps on a reconstruction loss: the slices beyond the reach are still exactly zero
    opt = torch.optim.AdamW(clt.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(64, S * D), torch.randn(64, S * D)
    for _ in range(5):
        opt.zero_grad()
        (clt(x).out - y).pow(2).mean().backward()
        opt.step()
    for dec in clt.W_dec:
        assert torch.all(dec[:, w + 1:] == 0)


def test_reach_is_checked():
    from deepseemoe.dictionaries.coder import CoderConfig
    from deepseemoe.dictionaries.config import CoderSpec
    from deepseemoe.errors import DeepSeeMoEError

    with pytest.raises(DeepSeeMoEError, match="only for kind clt"):
        CoderSpec(kind="sae", layers=[0], neighbours=1)
    with pytest.raises(DeepSeeMoEError, match="count ≥ 0"):
        CoderSpec(kind="clt", layers="all", neighbours=-1)
    with pytest.raises(DeepSeeMoEError, match="only for kind clt"):
        CoderConfig(d_in=8, n_latents=16, neighbours=0)
    assert CoderSpec(kind="clt", layers="all", neighbours=1).name == "clt_w1_all"


def test_two_reaches_train_side_by_side_and_spread_within_their_reach(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 20) + "\n")
    config = {"model": str(tiny_olmoe_dir), "data": str(docs), "out": str(tmp_path / "run"), "tokens": 2048,
              "ctx_len": 32, "domain_field": "domain", "train": {"batch_size": 256, "buffer_size": 512},
              "coders": [{"kind": "clt", "layers": "all", "k": 4, "expansion_factor": 2, "neighbours": 0},
                         {"kind": "clt", "layers": "all", "k": 4, "expansion_factor": 2}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli("train", tmp_path / "run.yaml").code == 0
    assert cli("evaluate", tmp_path / "run", "--tokens", "600").code == 0
    doc = json.loads((tmp_path / "run" / "evaluation.json").read_text())["coders"]
    assert set(doc) == {"clt_w0_all", "clt_all"}
    w0 = doc["clt_w0_all"]["layer_spread"]
    assert w0["histogram"]["2"] == 0 and w0["share_by_offset"][1] == 0  # each feature writes its own layer only
    assert doc["clt_all"]["layer_spread"]["share_by_offset"][1] > 0
