"""SAEs on each compared model at equal width: the reconstruction–sparsity frontier on the residual
stream (one training run per model, all k values from the same forward passes, then `evaluate` on
held-out text), and for each MoE an SAE on the block input with its feature ↔ expert map."""

from __future__ import annotations

from pathlib import Path

from deepseemoe.dictionaries.config import CoderSpec, RunSpec
from deepseemoe.dictionaries.evaluate import evaluate_run
from deepseemoe.dictionaries.trainer import TrainConfig
from deepseemoe.dictionaries.training import train_run
from deepseemoe.runs.dictionary import EVALUATION, DictionaryRun

METRICS = ("fvu", "l0", "dead", "delta_ce", "kl", "loss_recovered", "routing_preserved")


def _trained_and_evaluated(model: str, data: str, heldout: str, run_dir: Path, coders: list[CoderSpec], *,
                           tokens: int, eval_tokens: int, ctx_len: int, batch_size: int, train_batch: int,
                           dtype, device, device_map, trust_remote_code: bool) -> tuple[RunSpec, dict]:
    """One dictionary run of `coders` on `model` (trained and evaluated once; reused when its
    evaluation exists) → (its spec, its evaluation's per-coder metrics)."""
    spec = RunSpec(model=model, data=data, out=str(run_dir), tokens=tokens, ctx_len=ctx_len,
                   batch_size=batch_size, checkpoint_every=10**9, dtype=dtype, model_device=device,
                   coder_device=device, device_map=device_map, trust_remote_code=trust_remote_code, coders=coders,
                   train=TrainConfig(batch_size=train_batch, buffer_size=8 * train_batch, lr=1e-3,
                                     dead_after_tokens=max(tokens // 4, train_batch)))
    run = DictionaryRun(run_dir)
    if not (run_dir / EVALUATION).exists():
        if not run.coder_names():
            train_run(spec, progress=True, trust_remote_code=trust_remote_code)
        # the frontier reads FVU and ΔCE only: the SAEBench measures (and their random baselines) are skipped
        run.save_evaluation(evaluate_run(run_dir, data=heldout, tokens=eval_tokens, progress=False,
                                         trust_remote_code=trust_remote_code, benchmarks=False))
    return spec, run.evaluation()["coders"]


def sae_frontier(models: dict[str, str], data: str, heldout: str, out: Path, *, layer: int, ks: list[int],
                 expansion_factor: int, tokens: int, eval_tokens: int, ctx_len: int, batch_size: int = 8,
                 train_batch: int = 1024, dtype: str | None = None, device: str | None = None,
                 device_map: str | None = None, trust_remote_code: bool = False) -> dict:
    rows = {}
    for label, model in models.items():
        _, doc = _trained_and_evaluated(
            model, data, heldout, out / f"sae_{label}",
            [CoderSpec(kind="sae", layers=[layer], k=k, expansion_factor=expansion_factor, name=f"k{k}") for k in ks],
            tokens=tokens, eval_tokens=eval_tokens, ctx_len=ctx_len, batch_size=batch_size, train_batch=train_batch,
            dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
        rows[label] = [{"k": k, **{m: doc[f"k{k}"].get(m) for m in METRICS}} for k in ks]
    return {"layer": layer, "site": "resid_out", "expansion_factor": expansion_factor, "tokens": tokens,
            "rows": rows}


MAP_FIELDS = ("live_features", "features", "specificity_median", "expert_specific_share", "top_lift_median",
              "top_mi_bits_median", "routing_prediction")


def block_sae_maps(models: dict[str, str], data: str, heldout: str, out: Path, *, layer: int, k: int,
                   expansion_factor: int, tokens: int, eval_tokens: int, ctx_len: int, batch_size: int = 8,
                   train_batch: int = 1024, dtype: str | None = None, device: str | None = None,
                   device_map: str | None = None, trust_remote_code: bool = False) -> dict:
    """For each MoE: an SAE on the MoE block's input (what the router reads) at equal width and k,
    evaluated, and its feature map — feature ↔ expert specificity, lift and MI, and how well the
    features predict routing against token identity and bigrams (`features.statistics`)."""
    from deepseemoe.dictionaries.trained import TrainedRun
    from deepseemoe.features.map import compute_map

    rows = {}
    for label, model in models.items():
        run_dir = out / f"block_sae_{label}"
        _, doc = _trained_and_evaluated(
            model, data, heldout, run_dir,
            [CoderSpec(kind="sae", site="block_in", layers=[layer], k=k, expansion_factor=expansion_factor,
                       name="block_in")],
            tokens=tokens, eval_tokens=eval_tokens, ctx_len=ctx_len, batch_size=batch_size, train_batch=train_batch,
            dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
        run = DictionaryRun(run_dir)
        summary = run.map_summaries().get("block_in")
        if summary is None:
            trained = TrainedRun.open(run_dir, device=device, device_map=device_map, dtype=dtype,
                                      trust_remote_code=trust_remote_code)
            m = compute_map(trained, "block_in", data=heldout, tokens=4 * eval_tokens, layer=layer,
                            batch_size=batch_size, n_examples=3)
            run.save_map("block_in", m.tables, m.examples, m.summary)
            summary = m.summary
        rows[label] = {**{m: doc["block_in"].get(m) for m in METRICS}, **{f: summary.get(f) for f in MAP_FIELDS}}
    return {"layer": layer, "site": "block_in", "k": k, "expansion_factor": expansion_factor, "tokens": tokens,
            "rows": rows}


def dictionary_comparison(models: dict[str, str], moes: list[str], data: str, heldout: str, out: Path, *, layer: int,
                          ks: list[int], expansion_factor: int, tokens: int, eval_tokens: int, ctx_len: int,
                          **loading) -> dict:
    """The dictionaries' part of the MoE-vs-dense comparison (`compare` and the demo): the SAE
    frontier of every model {label: model} at each k, and the block-input SAE maps of the MoEs
    (`moes`: their labels) at the largest k. `loading`: dtype, device, device_map, trust_remote_code."""
    return {"sae_frontier": sae_frontier(models, data, heldout, out, layer=layer, ks=ks,
                                         expansion_factor=expansion_factor, tokens=tokens, eval_tokens=eval_tokens,
                                         ctx_len=ctx_len, **loading),
            "block_features": block_sae_maps({label: models[label] for label in moes}, data, heldout, out, layer=layer,
                                             k=ks[-1], expansion_factor=expansion_factor, tokens=tokens,
                                             eval_tokens=eval_tokens, ctx_len=ctx_len, **loading)}
