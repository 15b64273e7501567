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


def map_descriptions(experts: ExplanationStore, features: ExplanationStore, feature_experts: Path, *,
                     per_expert: int = 5, min_count: int = 3) -> list[ExpertDescriptions]:
    import pyarrow.parquet as pq

    expert_text = experts.explanations()
    feature_text = features.explanations()
    table = pq.read_table(feature_experts).to_pandas()
    table = table[table.feature.isin(list(feature_text)) & (table["count"] >= min_count) & (table.lift > 1)]
    out = []
    for e in sorted(expert_text):
        rows = table[table.expert == e].sort_values(["lift", "feature"], ascending=[False, True]).head(per_expert)
        out.append(ExpertDescriptions(e, expert_text[e], [(int(r.feature), float(r.lift), feature_text[int(r.feature)])
                                                          for r in rows.itertuples()]))
    return out
