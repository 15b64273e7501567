"""A sweep folder (the `out` of `deepseemoe sweep`): the only code that knows its layout.

    OUT/sweep.json          the settings (the config as resolved) and the key that identifies them
    OUT/activations/        the activation cache every seed's training reads (written once)
    OUT/seed-S/             one dictionary run per seed (runs/dictionary.py), every reach a coder of it,
                            with its evaluation.json on the held-out text
    OUT/table.json, .md     one row per reach: mean ± sd over the seeds, and the elbow
    OUT/figures/*.png       FVU and ΔCE against the reach; FVU per layer for each reach

A seed's folder with its evaluation is finished and reused; one without is trained again from its
checkpoint (train's own resume); settings that differ from sweep.json are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_bytes, atomic_write_json, read_json

SETTINGS, TABLE, TABLE_MD, FIGURES = "sweep.json", "table.json", "table.md", "figures"


@dataclass
class SweepRun:
    path: Path

    @classmethod
    def create(cls, path: str | Path, settings: dict, key: str) -> SweepRun:
        run = cls(Path(path))
        doc = run.path / SETTINGS
        if doc.exists():
            if read_json(doc, f"remove {run.path} and run the sweep again").get("key") != key:
                raise DeepSeeMoEError(f"{run.path} holds a sweep with other settings; choose another `out` or "
                                      "remove that folder")
        elif run.path.exists() and any(run.path.iterdir()):
            raise DeepSeeMoEError(f"{run.path} exists and is not a sweep; choose another `out`")
        else:
            atomic_write_json(doc, {"key": key, "settings": settings})
        return run

    @classmethod
    def open(cls, path: str | Path) -> SweepRun:
        run = cls(Path(path))
        if not (run.path / TABLE).exists():
            raise DeepSeeMoEError(f"{run.path} holds no finished sweep (no {TABLE}); run `deepseemoe sweep` to the end")
        return run

    @property
    def activations(self) -> Path:
        return self.path / "activations"

    def seed_dir(self, seed: int) -> Path:
        return self.path / f"seed-{seed}"

    def settings(self) -> dict:
        return read_json(self.path / SETTINGS, f"remove {self.path} and run the sweep again")

    def save_table(self, doc: dict, markdown: str, draw: Callable[[Path], list[Path]] | None = None) -> None:
        """figures/ first, table.json last: a finished sweep is one whose table.json exists."""
        if draw is not None:
            draw(self.path / FIGURES)
        atomic_write_bytes(self.path / TABLE_MD, markdown.encode())
        atomic_write_json(self.path / TABLE, doc)

    def table(self) -> dict:
        return read_json(self.path / TABLE, f"remove {self.path / TABLE} and run the sweep again")

    def table_markdown(self) -> str:
        return (self.path / TABLE_MD).read_text()

    def figures(self) -> list[Path]:
        return sorted((self.path / FIGURES).glob("*.png"))
