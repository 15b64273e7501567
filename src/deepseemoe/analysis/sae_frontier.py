"""The SAE reconstruction–sparsity frontier of two models at equal width: one training run per
model (all k values from the same forward passes), then `evaluate` on held-out text."""

from __future__ import annotations

from pathlib import Path

from deepseemoe.dictionaries.evaluate import evaluate_run
from deepseemoe.dictionaries.run import train_run
from deepseemoe.dictionaries.spec import CoderSpec, RunSpec
from deepseemoe.dictionaries.trainer import TrainConfig
from deepseemoe.runs.dictionary import EVALUATION, DictionaryRun


def sae_frontier(models: dict[str, str], data: str, heldout: str, out: Path, *, layer: int, ks: list[int],
                 expansion_factor: int, tokens: int, eval_tokens: int, ctx_len: int, batch_size: int = 8,
                 train_batch: int = 1024, dtype: str | None = None, device: str | None = None,
                 device_map: str | None = None, trust_remote_code: bool = False) -> dict:
    rows = {}
    for label, model in models.items():
        run_dir = out / f"sae_{label}"
        spec = RunSpec(model=model, data=data, out=str(run_dir), tokens=tokens, ctx_len=ctx_len,
                       batch_size=batch_size, checkpoint_every=10**9, dtype=dtype, model_device=device,
                       coder_device=device, device_map=device_map, trust_remote_code=trust_remote_code,
                       coders=[CoderSpec(kind="sae", layers=[layer], k=k, expansion_factor=expansion_factor,
                                         name=f"k{k}") for k in ks],
                       train=TrainConfig(batch_size=train_batch, buffer_size=8 * train_batch, lr=1e-3,
                                         dead_after_tokens=max(tokens // 4, train_batch)))
        run = DictionaryRun(run_dir)
        if not (run_dir / EVALUATION).exists():
            if not run.coder_names():
                train_run(spec, progress=True, trust_remote_code=trust_remote_code)
            run.save_evaluation(evaluate_run(run_dir, data=heldout, tokens=eval_tokens, progress=False,
                                             trust_remote_code=trust_remote_code))
        doc = run.evaluation()["coders"]
        rows[label] = [{"k": k, **{m: doc[f"k{k}"].get(m) for m in ("fvu", "l0", "dead", "delta_ce", "kl",
                                                                 "loss_recovered", "routing_preserved")}}
                       for k in ks]
    return {"layer": layer, "site": "resid_out", "expansion_factor": expansion_factor, "tokens": tokens,
            "rows": rows}
