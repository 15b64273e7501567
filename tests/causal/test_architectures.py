"""The causal checks, the feature map and the unit selectivity run on tiny random models of the
five architectures the issue names (no tokenizer: packed batches are built by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepseemoe.capture.core import Site
from deepseemoe.causal.checks import run_causal_checks
from deepseemoe.compare.selectivity import unit_selectivity
from deepseemoe.data.tokens import PackedBatch
from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.features.statistics import collect_for_map, feature_expert_tables, routing_prediction
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.tiny import tiny_model

ARCHS = ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def batches(vocab: int, n: int = 2, B: int = 2, S: int = 16) -> list[PackedBatch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (B, S), generator=g)
        doc = torch.arange(B)[:, None].expand(B, S) + i * B
        pos = torch.arange(S, dtype=torch.int32)[None].expand(B, S)
        out.append(PackedBatch(ids, torch.ones(B, S, dtype=torch.long), doc.contiguous(), pos.contiguous(),
                               {int(d): ("a" if d % 2 else "b") for d in doc[:, 0]}))
    return out


@pytest.mark.parametrize("model_type", ARCHS)
def test_analyses_run_on_each_architecture(model_type):
    handle = handle_from_model(tiny_model(model_type))
    data = batches(handle.model.config.vocab_size)
    layer = min(handle.moe_layers)
    E = handle.moe_layers[layer].num_experts
    res = run_causal_checks(handle, data, layers=[layer], experts=[0, 1, 2], progress=False)
    assert len(res["experts"]) == 3 and res["layers"][0]["layer"] == layer
    assert all(math.isfinite(r["ablate_delta_ce"]) and r["control_kl"] >= 0 for r in res["experts"])

    D = handle.model.config.hidden_size
    sae = build_coder(CoderConfig(d_in=D, n_latents=32, k=4))
    got = collect_for_map(handle, sae, [Site("block_in", layer)], layer, data, attribution=True)
    assert got.attribution.max_abs_error < 1e-4 * max(1.0, got.attribution.logit_scale)
    t = feature_expert_tables(got.latents, got.experts, E)
    assert np.isfinite(t["counts"]).all() and t["counts"].sum() > 0
    assert (t["p_e_given_f"][t["fires"] > 0].sum(1) == pytest.approx(handle.moe_layers[layer].top_k))
    rp = routing_prediction(got.latents, got.experts, got.tokens, got.prev_tokens, E)
    assert 0 <= rp["features"] <= 1

    names = ["a", "b"]

    def class_of(b):
        return torch.tensor([0 if b.domains[int(d)] == "a" else 1 for d in b.doc.reshape(-1).tolist()])

    sel = unit_selectivity(handle, data, class_of, 2, expert_neurons=False)
    assert "expert" in sel["units"] and "attention_head" in sel["units"]
    assert 0 < sel["counts"].sum() <= sum(b.input_ids.numel() for b in data) and len(names) == 2
