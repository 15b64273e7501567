"""Descriptions mapped onto each other through the feature map: per expert, its own description and
those of the features whose tokens go to it most (ranked by lift, from `deepseemoe map`).

Inputs are files only: the experts' ExplanationStore of a routing run (layer L), a dictionary's
feature ExplanationStore, and that dictionary's maps/NAME/feature_experts.parquet for layer L.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deepseemoe.runs.explanations import ExplanationStore


@dataclass
class ExpertDescriptions:
    expert: int
    description: str
    features: list[tuple[int, float, str]]  # (feature, lift, its description), highest lift first


def map_descriptions(experts: ExplanationStore, features: ExplanationStore, feature_experts: dict[str, list], *,
                     per_expert: int = 5, min_count: int = 3) -> list[ExpertDescriptions]:
    """`feature_experts`: the map's feature_experts table as columns (`DictionaryRun.map_table`)."""
    import pandas as pd

    expert_text = experts.explanations()
    feature_text = features.explanations()
    table = pd.DataFrame(feature_experts)
    table = table[table.feature.isin(list(feature_text)) & (table["count"] >= min_count) & (table.lift > 1)]
    out = []
    for e in sorted(expert_text):
        rows = table[table.expert == e].sort_values(["lift", "feature"], ascending=[False, True]).head(per_expert)
        out.append(ExpertDescriptions(e, expert_text[e], [(int(r.feature), float(r.lift), feature_text[int(r.feature)])
                                                          for r in rows.itertuples()]))
    return out


def feature_descriptions(run_dir: Path, names: list[str]) -> dict[tuple[str, int], str]:
    """The descriptions `explain` wrote for the features of the dictionaries `names` of a dictionary
    run, keyed (dictionary, feature), as an attribution graph labels its feature nodes; units
    without a usable description are left out."""
    from deepseemoe.explain.explainer import NO_DESCRIPTION, UNPARSED
    from deepseemoe.runs.explanations import stores_in

    out = {}
    for store in stores_in(run_dir).values():
        if store.module in names:
            out.update({(store.module, u): text for u, text in store.explanations().items()
                        if text not in (NO_DESCRIPTION, UNPARSED)})
    return out
