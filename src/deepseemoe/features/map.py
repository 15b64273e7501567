"""`deepseemoe map`: run the analyses of `features.statistics` for one dictionary; the run saves the result as

    RUN_DIR/maps/NAME/summary.json            layer, routing prediction, attribution check, specificity
    RUN_DIR/maps/NAME/features.parquet        per feature: fires, specificity, top expert by lift (+ MI),
                                              the expert it promotes most (virtual router weight)
    RUN_DIR/maps/NAME/feature_experts.parquet per live (feature, expert): count, P(e|f), lift, MI
    RUN_DIR/maps/NAME/router_attribution.parquet  SAEs on the block input: the feature × expert table of
                                              router-logit attribution (`statistics.attribution_table`;
                                              dense up to 64 experts, else each feature's top 16)
    RUN_DIR/maps/NAME/expert_composition.parquet  block transcoders: per (expert, feature) the share of
                                              the expert's routed output the feature writes along it
    RUN_DIR/maps/NAME/examples.json           per feature: top-activating and per-quantile contexts, with experts
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from deepseemoe.capture.core import Site
from deepseemoe.dictionaries.trained import TrainedRun
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.features.statistics import (
    attribution_table,
    collect_for_map,
    composition_from_sums,
    feature_expert_tables,
    routing_prediction,
    top_examples,
)
from deepseemoe.models.handle import fed_moe_layer


def fed_layer(source: list[Site], moe_layers: list[int]) -> int:
    """The MoE layer a source site feeds (models.handle.fed_moe_layer), refused when there is none."""
    layer = fed_moe_layer(source[0], moe_layers)
    if layer is None:
        start = source[0].layer + 1 if source[0].kind == "resid_out" else source[0].layer
        raise DeepSeeMoEError(f"no MoE layer at or after layer {start}; MoE layers: {moe_layers}")
    return layer


@dataclass
class FeatureMap:
    """What `map` computes for one dictionary; `DictionaryRun.save_map` writes it as maps/NAME/."""

    tables: dict[str, pa.Table]  # file stem -> table (columns in the module docstring)
    examples: dict[str, list]  # feature -> top examples with their routing
    summary: dict


def compute_map(trained: TrainedRun, name: str, *, data: str | None, tokens: int, layer: int | None,
                batch_size: int, n_examples: int, progress: bool = False) -> FeatureMap:
    coder, record = trained.coder(name)
    handle = trained.model()
    sources = list(record.sources)
    layer = fed_layer(sources, sorted(handle.moe_layers)) if layer is None else layer
    if layer not in handle.moe_layers:
        raise DeepSeeMoEError(f"--layer {layer} is not an MoE layer of {handle.name}; choose from "
                              f"{sorted(handle.moe_layers)}")
    attribution = record.kind == "sae" and sources == [Site("block_in", layer)]
    batches = trained.batches(data=data, batch_size=batch_size, tokens=tokens)
    targets = list(record.targets)
    composition = record.kind in ("transcoder", "skip_transcoder") and targets == [Site("block_out", layer)]
    got = collect_for_map(handle, coder, sources, layer, batches, attribution, composition, progress=progress)
    moe = handle.moe_layers[layer]
    tables = feature_expert_tables(got.latents, got.experts, moe.num_experts)
    live = tables["fires"] > 0
    out: dict[str, pa.Table] = {}
    lift = np.nan_to_num(tables["lift"], nan=-1.0)
    F = len(tables["fires"])
    cols = {"feature": np.arange(F), "fires": tables["fires"].astype(np.int64),
            "specificity": tables["specificity"], "top_expert": lift.argmax(1), "top_lift": lift.max(1),
            "top_mi_expert": tables["mi_bits"].argmax(1), "top_mi_bits": tables["mi_bits"].max(1)}
    if got.attribution is not None:
        cols["promoted_expert"] = got.attribution.virtual.argmax(1).numpy()
        cols["promoted_logit_per_unit"] = got.attribution.virtual.max(1).values.numpy()
        out["router_attribution"] = pa.table(attribution_table(got.attribution.virtual, got.latents))
    comp = None
    if composition:
        comp = composition_from_sums(*got.composition)
        cols["composition_top_expert"] = comp["top_expert"]
        cols["composition_specificity"] = comp["specificity"]
        e_idx, f_idx = np.meshgrid(np.arange(moe.num_experts), np.arange(F), indexing="ij")
        out["expert_composition"] = (pa.table({
            "expert": e_idx.reshape(-1), "feature": f_idx.reshape(-1), "share": comp["share"].T.reshape(-1)}))
    out["features"] = pa.table(cols)
    f_idx, e_idx = np.nonzero(tables["counts"] > 0)
    out["feature_experts"] = (pa.table({
        "feature": f_idx, "expert": e_idx, "count": tables["counts"][f_idx, e_idx].astype(np.int64),
        "p_e_given_f": tables["p_e_given_f"][f_idx, e_idx], "lift": tables["lift"][f_idx, e_idx],
        "mi_bits": tables["mi_bits"][f_idx, e_idx]}))
    order = np.argsort(-tables["fires"])[: int(live.sum())]  # every live feature, the most active first
    ex = top_examples(got.latents, got.where, got.contexts, got.experts, handle.tokenizer, n=n_examples,
                      features=[int(f) for f in order])
    examples = {str(k): v for k, v in ex.items()}
    summary = {"dictionary": name, "layer": layer, "top_k": moe.top_k, "num_experts": moe.num_experts,
               "tokens": tables["tokens"], "live_features": int(live.sum()), "features": F,
               "specificity_median": float(np.nanmedian(tables["specificity"])) if live.any() else float("nan"),
               "expert_specific_share": float(np.nanmean(tables["specificity"][live] > 0.5)) if live.any() else 0.0,
               # per live feature, its strongest expert association: max_e lift(f, e) and max_e MI(f; e)
               "top_lift_median": float(np.median(np.nanmax(tables["lift"][live], 1))) if live.any() else float("nan"),
               "top_mi_bits_median": float(np.median(np.nanmax(tables["mi_bits"][live], 1)))
               if live.any() else float("nan"),
               "routing_prediction": routing_prediction(got.latents, got.experts, got.tokens, got.prev_tokens,
                                                        moe.num_experts)}
    if comp is not None:
        spec = comp["specificity"][live]
        spec = spec[~np.isnan(spec)]
        summary["composition"] = {
            "median_specificity": float(np.median(spec)) if len(spec) else float("nan"),
            "expert_specific_share": float((spec > 0.5).mean()) if len(spec) else 0.0,
            "routed_share_explained": {str(e): float(comp["share"][:, e].sum()) for e in range(moe.num_experts)}}
    if got.attribution is not None:
        a = got.attribution
        summary["attribution"] = {"max_abs_error": a.max_abs_error, "logit_scale": a.logit_scale,
                                  "error_share": float(a.error.abs().mean() / (a.features.abs().mean()
                                                                               + a.error.abs().mean()))}
    return FeatureMap(out, examples, summary)
