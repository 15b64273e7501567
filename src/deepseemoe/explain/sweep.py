"""Auto-interpretability of a sweep's dictionaries (`sweep.autointerp`): for one seed's run, a few live
features of each table row's dictionaries, drawn at random, explained and scored beside shuffled
descriptions. A row's features are split evenly over its dictionaries (an SAE set's layers), two
at least each (the shuffled baseline gives each feature another one's description). Saved in each dictionary's explanation store of the seed's run (runs/explanations.py) and
reused while the features, text, explainer, judge and prompts are the same."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from deepseemoe.compare.sweep import SweepSettings
from deepseemoe.explain.backends import ChatBackend
from deepseemoe.explain.explainer import Prompts
from deepseemoe.explain.pipeline import feature_sources, run_explain, run_score
from deepseemoe.runs.explanations import ExplanationStore


def seed_scorer(settings: SweepSettings, backend: ChatBackend, judge=None, *, sizes: dict | None = None,
                window: int = 24, retries: int = 2, trust_remote_code: bool = False
                ) -> Callable[[int, Path], dict[str, dict]]:
    """The `autointerp` function `run_sweep` calls per seed: (seed, the seed's run folder) →
    {dictionary: the summary of its scores (explain.pipeline.run_score)}."""
    ai = settings.autointerp
    prompts = Prompts.load()
    scorer_ident = (judge or backend).ident

    def score(seed: int, folder: Path) -> dict[str, dict]:
        # two at least: the shuffled baseline gives each feature another feature's description
        per_coder = {name: max(2, math.ceil(ai["features"] / len(names)))
                     for names in settings.rows_of_coders().values() for name in names}
        wanted = {"dictionaries": per_coder, "tokens": ai["tokens"], "data": settings.eval, "sample_seed": seed,
                  "window": window, "sizes": sizes or {}}
        stores = {name: ExplanationStore.for_features(folder, name) for name in per_coder}
        out, todo = {}, {}
        for name, store in stores.items():
            summary = store.summary()
            if summary and summary.get("sweep") == wanted and summary.get("explained_by") == backend.ident \
                    and summary.get("backend") == scorer_ident and summary.get("prompts_sha256") == prompts.digest() \
                    and sorted(summary.get("scorers", {})) == sorted(ai["scorers"]):
                out[name] = summary
            else:
                todo[name] = per_coder[name]
        if not todo:
            return out
        # a dictionary with no feature firing often enough on this text gets no scores (its cells stay
        # empty) rather than stopping the sweep after every seed has trained
        corpus, sources = feature_sources(folder, todo, data=settings.eval, tokens=ai["tokens"], sample_seed=seed,
                                          trust_remote_code=trust_remote_code, skip_quiet=True)
        for name, (acts, units, contexts) in sources.items():
            run_explain(stores[name], corpus, acts, units, contexts, backend, prompts, kind="feature",
                        source={"run": str(folder), "dictionary": name, "tokens": ai["tokens"]}, window=window,
                        seed=seed, sizes=sizes, retries=retries)
            summary = run_score(stores[name], judge or backend, prompts, list(ai["scorers"]))
            summary["sweep"] = wanted  # what a rerun compares before reusing these scores
            stores[name].save_summary(summary)
            out[name] = summary
        return out

    return score
