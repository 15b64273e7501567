"""Features as hints: which features mark the target text, and which experts they route to.

A hint comes from a dictionary trained on the base model and its `map` (features ↔ experts of the
MoE layer the dictionary feeds, counted on the dictionary run's own, general, text):
- hint features: the features whose firing rate on the target text most exceeds their rate on the
  general text (lift, with add-one smoothing on the general counts), among those that fire on at
  least `min_fires` target tokens;
- hinted experts: the experts those features route to, scored by the tokens of hint features routed
  there where the map's lift(feature, expert) > 1, the best `experts` of them.
The dictionary must read the residual stream at or before that layer's router, so the hint's token
mask computed once on the base model stays exact while only that layer's router or experts train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deepseemoe.capture.core import Site
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle

UPSTREAM = ("resid_in", "block_in")  # sites at the hint layer that its router reads or precedes


@dataclass
class Hint:
    run_dir: str
    dictionary: str
    layer: int
    features: list[int]
    feature_lift: list[float]
    target_rate: list[float]
    general_rate: list[float]
    experts: list[int]
    expert_score: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HintSource:
    """A dictionary and its map, checked against the model being post-trained."""

    run_dir: Path
    name: str
    coder: object
    sources: list[Site]
    layer: int
    fires: np.ndarray  # [F] on the general text
    tokens: int
    feature_experts: dict[str, np.ndarray]  # feature, expert, count, lift


def open_hint(spec: str, handle: ModelHandle, model_id: str) -> HintSource:
    """`RUN_DIR:DICTIONARY` → the coder, its source sites and its map; refused when it was trained on
    another model or reads a site the hint layer's router does not precede."""
    from deepseemoe.dictionaries.trained import TrainedRun

    run_dir, sep, name = spec.rpartition(":")
    if not sep or not run_dir or not name:
        raise DeepSeeMoEError(f"--hint {spec!r} must be RUN_DIR:DICTIONARY (a `deepseemoe train` folder and the name "
                              "of one of its dictionaries)")
    trained = TrainedRun.open(run_dir, device="cpu")
    run, rs = trained.run, trained.spec
    summaries = run.map_summaries()
    if name not in summaries:
        raise DeepSeeMoEError(f"dictionary {name!r} of {run_dir} has no map; run `deepseemoe map {run_dir} --dictionary "
                              f"{name}` first")
    summary = summaries[name]
    coder, record = trained.coder(name)
    # the weights' checksums recorded when it was trained (a moved folder is still the same model);
    # a dictionary from before they were recorded is identified by its model's path
    trained_on = record.meta.get("model_weights") or model_identity(rs.model)
    if trained_on != model_id:
        raise DeepSeeMoEError(f"the hint dictionary {name!r} was trained on {rs.model}, not on the model being "
                              "post-trained; train and map a dictionary on this model")
    sources = list(record.sources)
    layer = int(summary["layer"])
    if layer not in handle.moe_layers:
        raise DeepSeeMoEError(f"the hint's map relates features to layer {layer}, not an MoE layer of {handle.name}")
    late = [s for s in sources if s.layer > layer or (s.layer == layer and s.kind not in UPSTREAM)]
    if late:
        raise DeepSeeMoEError(f"the hint dictionary {name!r} reads {late[0].kind} of layer {late[0].layer}, which the "
                              f"router of layer {layer} does not precede; use a dictionary on block_in {layer}")
    feats = run.map_table(name, "features")
    fe = run.map_table(name, "feature_experts")
    fires = np.zeros(len(feats["feature"]), np.int64)
    fires[np.asarray(feats["feature"])] = np.asarray(feats["fires"])
    return HintSource(Path(run_dir), name, coder, sources, layer, fires, int(summary["tokens"]),
                      {k: np.asarray(fe[k]) for k in ("feature", "expert", "count", "lift")})


def model_identity(model: str) -> str:
    """A model's identity for comparing runs: its weights' checksums when it is a folder, else its name."""
    from deepseemoe.runs.stamp import model_digest

    path = Path(model)
    return model_digest(path) if path.is_dir() else model


@torch.no_grad()
def latents_by_batch(handle: ModelHandle, source: HintSource, batches: list) -> list[torch.Tensor]:
    """The dictionary's latents of every kept token of each batch (base model): [T_kept, F] per batch."""
    from deepseemoe.dictionaries.stream import model_stream

    pairs = {"src": (source.sources, source.sources[:1])}
    out = []
    for item in model_stream(handle, batches, pairs):
        out.append(source.coder.encode(item["src"][0].float()).cpu())
    return out


def token_mask(latents: list[torch.Tensor], batches: list, features: list[int]) -> list[torch.Tensor]:
    """[B·S] bool per batch: the kept tokens on which any hint feature fires (latent > 0)."""
    out = []
    for lat, b in zip(latents, batches, strict=True):
        mask = torch.zeros(b.input_ids.numel(), dtype=torch.bool)
        mask[b.keep] = (lat[:, features] > 0).any(1)
        out.append(mask)
    return out


def choose_hint(source: HintSource, target_latents: list[torch.Tensor], *, n_features: int, experts: float,
                num_experts: int, min_fires: int = 5) -> Hint:
    """The target text's most distinctive features and the experts they route to (module docstring).
    `experts`: a count (≥ 1) or a share of the layer's experts (< 1)."""
    lat = torch.cat(target_latents)
    n_target = len(lat)
    fires_t = (lat > 0).sum(0).numpy()
    rate_t = fires_t / max(n_target, 1)
    rate_g = (source.fires + 1) / (source.tokens + 1)
    lift = rate_t / rate_g
    ok = fires_t >= max(min_fires, int(0.001 * n_target))
    if not ok.any():
        raise DeepSeeMoEError(f"no feature of {source.name!r} fires on {min_fires} or more target tokens; give more "
                              "target text or another hint dictionary")
    order = [int(f) for f in np.argsort(-np.where(ok, lift, -np.inf)) if ok[f]][:n_features]
    budget = round(experts * num_experts) if experts < 1 else int(experts)
    if budget < 1:
        raise DeepSeeMoEError(f"--experts {experts} of {num_experts} experts rounds to zero experts; give a count ≥ 1 "
                              f"or a share ≥ {0.5 / num_experts:.3g}")
    fe = source.feature_experts
    sel = np.isin(fe["feature"], order) & (np.nan_to_num(fe["lift"], nan=0.0) > 1)
    score = np.bincount(fe["expert"][sel], weights=fe["count"][sel], minlength=num_experts)
    ranked = [int(e) for e in np.argsort(-score, kind="stable") if score[e] > 0][:budget]
    if not ranked:
        raise DeepSeeMoEError(f"the hint features {order} route to no expert above chance in the map of "
                              f"{source.name!r}; map the dictionary on more text")
    return Hint(str(source.run_dir), source.name, source.layer, order, [float(lift[f]) for f in order],
                [float(rate_t[f]) for f in order], [float(rate_g[f]) for f in order], ranked,
                [int(score[e]) for e in ranked])
