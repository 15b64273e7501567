"""The explanations of one module's units (a dictionary's features, or one MoE layer's experts):
the only code that knows this layout. Explanation and score files are delphi's, so delphi's own
analysis (`delphi.log.result_analysis.load_data`) reads the scores.

    FOLDER/explanations/{module}_latent{u}.txt      the explanation, a JSON string (delphi)
    FOLDER/scores/{scorer}/{module}_latent{u}.txt   JSON list of records, one per scored example
    FOLDER/scores/{scorer}_shuffled/…               the same scorer given another unit's explanation
    FOLDER/examples.json                            what each unit was explained on and scored on
    FOLDER/units.parquet                            per unit: explanation, scores, baselines, counts
    FOLDER/summary.json                             backend, prompts' sha256, pooled scores vs baselines

FOLDER is RUN/explanations/NAME for a dictionary of a training run, RUN_DIR/explanations/layer{L}
for the experts of a routing run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_bytes, atomic_write_json, atomic_write_table, read_json


@dataclass
class ExplanationStore:
    path: Path
    module: str  # delphi's hookpoint name: the dictionary's name, or layer{L}.experts

    @classmethod
    def for_experts(cls, run_dir: str | Path, layer: int) -> ExplanationStore:
        """The descriptions of one layer's experts in a routing run (RUN/explanations/layerL/)."""
        return cls(Path(run_dir) / "explanations" / f"layer{layer}", f"layer{layer}.experts")

    @classmethod
    def for_features(cls, run_dir: str | Path, dictionary: str) -> ExplanationStore:
        """The descriptions of a dictionary's features in its training run (RUN/explanations/NAME/)."""
        return cls(Path(run_dir) / "explanations" / dictionary, dictionary)

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def _unit_file(self, sub: str, unit: int) -> Path:
        return self.path / sub / f"{self.module}_latent{unit}.txt"

    def save_explanations(self, explanations: dict[int, str]) -> None:
        for unit, text in explanations.items():
            atomic_write_bytes(self._unit_file("explanations", unit), json.dumps(text, ensure_ascii=False).encode())

    def explanations(self) -> dict[int, str]:
        folder = self.path / "explanations"
        out = {}
        for f in sorted(folder.glob(f"{self.module}_latent*.txt")) if folder.is_dir() else []:
            try:
                text = json.loads(f.read_text(encoding="utf-8"))
            except ValueError:
                raise DeepSeeMoEError(f"{f} is damaged; run `deepseemoe explain` again") from None
            out[int(f.stem.rsplit("latent", 1)[1])] = str(text)
        return out

    def save_scores(self, scorer: str, unit: int, records: list[dict]) -> None:
        atomic_write_bytes(self._unit_file(f"scores/{scorer}", unit), json.dumps(records, ensure_ascii=False).encode())

    def clear_scores(self) -> None:
        """A new scoring replaces the old one as a whole: score files of scorers it does not run again
        would otherwise sit beside a summary that no longer lists them (and delphi's loader reads them)."""
        import shutil

        self.summary_path.unlink(missing_ok=True)  # first: no summary names a half-cleared folder
        shutil.rmtree(self.path / "scores", ignore_errors=True)

    def scores(self, scorer: str) -> dict[int, list[dict]]:
        folder = self.path / "scores" / scorer
        out = {}
        for f in sorted(folder.glob(f"{self.module}_latent*.txt")) if folder.is_dir() else []:
            out[int(f.stem.rsplit("latent", 1)[1])] = json.loads(f.read_text(encoding="utf-8"))
        return out

    def save_examples(self, doc: dict) -> None:
        """A new set of examples: what was explained and scored on the old one goes first."""
        import shutil

        for sub in ("explanations", "scores"):
            shutil.rmtree(self.path / sub, ignore_errors=True)
        for name in ("units.parquet", "summary.json"):
            (self.path / name).unlink(missing_ok=True)
        atomic_write_json(self.path / "examples.json", doc)

    @property
    def has_examples(self) -> bool:
        """`explain` has written what each unit was explained on."""
        return (self.path / "examples.json").exists()

    def examples(self) -> dict:
        path = self.path / "examples.json"
        if not path.exists():
            raise DeepSeeMoEError(f"{self.path} has no explanations yet; run `deepseemoe explain` first")
        return read_json(path, "run `deepseemoe explain` again")

    def save_summary(self, summary: dict, units_table=None) -> None:
        if units_table is not None:
            atomic_write_table(self.path / "units.parquet", units_table)
        atomic_write_json(self.summary_path, summary)

    def summary(self) -> dict | None:
        path = self.summary_path
        return read_json(path, "run `deepseemoe score` again") if path.exists() else None

    def units_table(self):
        import pyarrow.parquet as pq

        path = self.path / "units.parquet"
        return pq.read_table(path) if path.exists() else None


def stores_in(run_dir: str | Path) -> dict[str, ExplanationStore]:
    """Every explanation folder of a run, by name."""
    folder = Path(run_dir) / "explanations"
    out = {}
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (sub / "examples.json").exists():
            doc = read_json(sub / "examples.json", "run `deepseemoe explain` again")
            out[sub.name] = ExplanationStore(sub, doc.get("module", sub.name))
    return out
