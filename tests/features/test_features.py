"""Features ↔ experts on hand-built cases, and exact router attribution on five architectures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from deepseemoe.capture.consumers import ActivationCollector
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.cli import app
from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.features.statistics import (
    _mi_bits,
    feature_expert_tables,
    recall_at_k,
    router_attribution,
    routing_prediction,
)
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.routers import router_linear
from deepseemoe.models.tiny import tiny_model


def test_tables_by_hand():
    # 4 tokens, 2 features, E = 3, K = 1: f0 fires on tokens 0,1 (experts 0, 0); f1 on 1,2,3 (0, 1, 2)
    lat = torch.tensor([[1.0, 0], [2.0, 1.0], [0, 3.0], [0, 0.5]])
    idx = torch.tensor([[0], [0], [1], [2]])
    t = feature_expert_tables(lat, idx, 3)
    np.testing.assert_allclose(t["counts"], [[2, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(t["p_e_given_f"][0], [1, 0, 0])
    np.testing.assert_allclose(t["lift"][0], [1 / 0.5, 0, 0])  # P(e0) = 2/4
    assert t["specificity"][0] == pytest.approx(1.0) and t["specificity"][1] == pytest.approx(0.0)
    # MI(f0; e0): f0 fires exactly when e0 is chosen, P = 1/2 → 1 bit
    assert t["mi_bits"][0, 0] == pytest.approx(1.0)


def test_mi_of_independent_events_is_zero():
    assert float(_mi_bits(np.array(25.0), np.array(50.0), np.array(50.0), 100)) == pytest.approx(0.0, abs=1e-12)


def test_recall_and_routing_prediction_by_construction():
    assert recall_at_k(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[1, 0]])) == 0.5
    g = torch.Generator().manual_seed(0)
    T, E = 4000, 4
    experts = torch.randint(0, E, (T,), generator=g)
    lat = torch.nn.functional.one_hot(experts, E).float()  # feature e fires iff expert e is chosen
    tokens = torch.randint(0, 50, (T,), generator=g)  # token identity carries no information
    res = routing_prediction(lat, experts[:, None], tokens, torch.roll(tokens, 1), E)
    assert res["features"] == 1.0
    assert abs(res["token"] - 0.25) < 0.05 and abs(res["load_only"] - 0.25) < 0.05


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_router_attribution_adds_back_to_the_router_logits(model_type):
    handle = handle_from_model(tiny_model(model_type))
    layer = min(handle.moe_layers)
    collector = ActivationCollector([Site("block_in", layer), Site("router_logits", layer)])
    ids = torch.randint(3, handle.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    run_capture(handle, ids, [collector])
    x, logits = collector.chunks[Site("block_in", layer)][0], collector.chunks[Site("router_logits", layer)][0]
    torch.manual_seed(0)
    sae = build_coder(CoderConfig(d_in=x.shape[1], n_latents=96, activation="relu"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.input_scale.fill_(0.5)
        sae.target_scale.fill_(0.5)
    W, b = router_linear(handle, layer)
    parts = router_attribution(sae, x.float(), W.float(), None if b is None else b.float())
    torch.testing.assert_close(parts["total"], logits.float(), atol=1e-5, rtol=1e-5)
    # the feature part is Σ_i f_i (W_r · d_i), recomputed feature by feature
    lat, dec = parts["latents"], sae.folded().W_dec
    manual = sum(lat[:, i:i + 1] * (W.float() @ dec[i])[None, :] for i in range(lat.shape[1]))
    torch.testing.assert_close(parts["features"], manual, atol=1e-5, rtol=1e-5)


def test_map_cli_on_a_trained_block_input_sae(tmp_path, tiny_olmoe_dir, corpus_jsonl):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 30) + "\n")
    config = {"model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(tmp_path / "run"), "ctx_len": 32,
              "tokens": 1024, "coders": [{"kind": "sae", "site": "block_in", "layers": [1], "k": 4,
                                          "expansion_factor": 2, "name": "router_sae"},
                                         {"kind": "transcoder", "layers": [1], "k": 4, "expansion_factor": 2}],
              "train": {"batch_size": 128, "buffer_size": 256, "lr": 3e-3}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tmp_path / "run.yaml")], catch_exceptions=False).exit_code == 0
    for name in ("router_sae", "transcoder_1"):
        r = runner.invoke(app, ["map", str(tmp_path / "run"), "--dictionary", name, "--tokens", "600"],
                          catch_exceptions=False)
        assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    s = json.loads((tmp_path / "run" / "maps" / "router_sae" / "summary.json").read_text())
    assert s["layer"] == 1 and s["attribution"]["max_abs_error"] < 1e-4 * max(1.0, s["attribution"]["logit_scale"])
    assert 0 <= s["routing_prediction"]["features"] <= 1 and not math.isnan(s["specificity_median"])
    tsum = json.loads((tmp_path / "run" / "maps" / "transcoder_1" / "summary.json").read_text())
    assert "attribution" not in tsum and 0 <= tsum["composition"]["expert_specific_share"] <= 1
    comp = pq.read_table(tmp_path / "run" / "maps" / "transcoder_1" / "expert_composition.parquet").to_pandas()
    assert len(comp) == 8 * 128  # experts × features
    fe = pq.read_table(tmp_path / "run" / "maps" / "router_sae" / "feature_experts.parquet").to_pandas()
    sums = fe.groupby("feature")["p_e_given_f"].sum()
    np.testing.assert_allclose(sums.values, 2.0)  # K = 2 experts per token
    # the full feature × expert router attribution, against W_r·d_i from the router and decoder themselves
    from deepseemoe.dictionaries.formats import load_run_dictionary
    from deepseemoe.models.load import load_model

    attr = pq.read_table(tmp_path / "run" / "maps" / "router_sae" / "router_attribution.parquet").to_pandas()
    coder, _ = load_run_dictionary(tmp_path / "run", "router_sae")
    W_r = load_model(str(tiny_olmoe_dir)).moe_layers[1].router.weight.detach().double()
    expected = coder.folded().W_dec.detach().double() @ W_r.T  # [F, E]
    assert len(attr) == expected.numel()
    np.testing.assert_allclose(attr["logit_per_unit"], expected[attr["feature"], attr["expert"]].numpy(), atol=1e-5)
    centred = expected - expected.mean(1, keepdim=True)
    np.testing.assert_allclose(attr["push_per_unit"], centred[attr["feature"], attr["expert"]].numpy(), atol=1e-5)
    examples = json.loads((tmp_path / "run" / "maps" / "router_sae" / "examples.json").read_text())
    first = next(iter(examples.values()))
    assert first["top"] and len(first["quantiles"]) == 4
    acts = [e["activation"] for q in first["quantiles"] for e in q]
    assert acts and max(acts) <= first["top"][0]["activation"] + 1e-6


def test_attribution_table_by_hand():
    from deepseemoe.features.statistics import attribution_table

    # 2 features, 3 experts; W_r·d: f0 → (3, 0, 0), f1 → (1, 1, 4)
    virtual = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 4.0]])
    # f0 fires on tokens 0, 1 (2, 4: mean 3 when active, 1.5 per token); f1 on token 3 (1: 1, 0.25)
    lat = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    t = attribution_table(virtual, lat)
    assert t["feature"].tolist() == [0, 0, 0, 1, 1, 1] and t["expert"].tolist() == [0, 1, 2] * 2
    np.testing.assert_allclose(t["logit_per_unit"], [3, 0, 0, 1, 1, 4])
    np.testing.assert_allclose(t["push_per_unit"], [2, -1, -1, -1, -1, 2])  # minus the row means 1 and 2
    np.testing.assert_allclose(t["mean_push_when_active"], [6, -3, -3, -1, -1, 2])
    np.testing.assert_allclose(t["mean_push_per_token"], [3, -1.5, -1.5, -0.25, -0.25, 0.5])
    # many experts: each feature keeps its top-n by |push|
    wide = torch.zeros(2, 80)
    wide[0, 5], wide[0, 7], wide[1, 9] = 8.0, -8.0, 4.0
    t = attribution_table(wide, lat, top_n=2)
    assert len(t["feature"]) == 4 and set(t["expert"][:2].tolist()) == {5, 7} and t["expert"][2] == 9


def test_quantile_picks_by_hand():
    from deepseemoe.features.statistics import quantile_picks

    v = torch.tensor([0.0, 5.0, 1.0, 0.0, 3.0, 2.0, 4.0, 6.0])  # positives sorted: 1,2,3,4,5,6
    picks = quantile_picks(v, bins=3, per_bin=5)
    assert [sorted(v[p].tolist()) for p in picks] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert quantile_picks(torch.zeros(4), 2, 3) == [[], []]


def test_expert_composition_by_hand():
    from deepseemoe.features.statistics import expert_composition

    # two experts whose outputs are e0 = (2, 0) and e1 = (0, 3); feature 0 writes along x, feature 1 along y
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx = torch.tensor([[0], [1], [0]])
    contrib = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]], [[2.0, 0.0]]])
    latents = torch.tensor([[2.0, 0.0], [0.0, 1.5], [1.0, 1.0]])
    out = expert_composition(latents, W_dec, idx, contrib, 2)
    # expert 0: tokens 0, 2 — num f0: 2·2 + 1·2 = 6, f1: 0; den 4 + 4 = 8 → 0.75, 0
    # expert 1: token 1 — f1: 1.5·3 = 4.5, den 9 → 0.5
    np.testing.assert_allclose(out["share"], [[0.75, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(out["specificity"], [1.0, 1.0])
    assert out["top_expert"].tolist() == [0, 1]


def test_composition_sums_do_not_depend_on_chunking():
    from deepseemoe.features.statistics import composition_sums

    g = torch.Generator().manual_seed(0)
    lat, W = torch.rand(50, 6, generator=g), torch.randn(6, 4, generator=g)
    idx, contrib = torch.randint(0, 3, (50, 2), generator=g), torch.randn(50, 2, 4, generator=g)
    a = composition_sums(lat, W, idx, contrib, 3, chunk=7)
    b = composition_sums(lat, W, idx, contrib, 3, chunk=1000)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)  # float32 products, float64 sums
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
    # and the numerator is Σ f_i ⟨d_i, c⟩ per expert, written out with loops
    ref = torch.zeros(3, 6, dtype=torch.float64)
    for t in range(50):
        for k in range(2):
            ref[idx[t, k]] += (lat[t] * (W @ contrib[t, k])).double()
    torch.testing.assert_close(b[0], ref, rtol=1e-5, atol=1e-5)
