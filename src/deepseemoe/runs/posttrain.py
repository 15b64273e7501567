"""A post-training run directory (the --out of `deepseemoe post-train`): the only code that knows its layout.

    OUT/posttrain.json                  the settings, the base model's identity, the hint (features and
                                        experts) and the base model's measures; written first
    OUT/points/NAME/                    one finished point (strategy × seed, or the dense twin), written whole:
        result.json                     its measures and the sha256 of every file of model/ or adapter/
        log.jsonl                       loss per step
        model/                          the post-trained model, adapters merged (a plain HF folder), or
        adapter/                        PEFT's adapter folder with --keep-adapters
    OUT/table.json, OUT/table.md        one row per strategy: mean and spread over the seeds, and the
                                        findings (sentences written from the table's numbers)
    OUT/figures/*.png                   gain vs forgetting (one point per seed), routing drift per layer
    OUT/metrics.jsonl                   every training step's loss, with --log (and wandb / tensorboard / trackio)

A point folder exists only when its point finished, so a killed run reruns only the missing points;
a rerun with other settings in the same folder is refused instead of mixing two studies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_bytes, atomic_write_json, read_json
from deepseemoe.runs.lock import atomic_dir
from deepseemoe.runs.manifest import sha256_file

SETTINGS = "posttrain.json"
POINTS = "points"
RESULT = "result.json"
TABLE = "table.json"
TABLE_MD = "table.md"
FIGURES = "figures"
METRICS = "metrics.jsonl"


@dataclass
class PostTrainRun:
    path: Path

    @classmethod
    def create(cls, path: str | Path, settings: dict) -> PostTrainRun:
        """The run at `path` for these settings: a new folder, or one a killed run with the same
        settings left (its finished points are kept). Another study's folder is refused."""
        run = cls(Path(path))
        doc = run.path / SETTINGS
        if doc.exists():
            old = read_json(doc, f"remove {run.path} and run again")
            if old.get("key") != settings["key"]:
                raise DeepSeeMoEError(f"{run.path} holds a post-training run with other settings (or made by "
                                      "another version of deepseemoe); choose another --out or remove that folder")
        elif run.path.exists() and any(run.path.iterdir()):
            raise DeepSeeMoEError(f"{run.path} exists and is not a post-training run; choose another --out")
        return run

    def save_settings(self, doc: dict) -> None:
        atomic_write_json(self.path / SETTINGS, doc)

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def point_dir(self, name: str) -> Path:
        return self.path / POINTS / name

    def finished(self, name: str) -> bool:
        return (self.point_dir(name) / RESULT).exists()

    def save_point(self, name: str, result: dict, write_model: Callable[[Path], None], log_lines: list[dict]) -> Path:
        """points/NAME written whole: `write_model(folder)` fills model/ or adapter/, then the checksums."""

        def write(tmp: Path) -> None:
            write_model(tmp)
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_bytes(tmp / "log.jsonl", "".join(json.dumps(m) + "\n" for m in log_lines).encode())
            atomic_write_json(tmp / RESULT, {**result, "files": files})

        return atomic_dir(self.point_dir(name), write)

    def point(self, name: str, verify: bool = True) -> dict:
        """result.json of a finished point; with `verify`, every model file is checked against its sha256."""
        folder = self.point_dir(name)
        again = f"remove {folder} and run `deepseemoe post-train` again"
        doc = read_json(folder / RESULT, again)
        if verify:
            for rel, digest in doc.get("files", {}).items():
                path = folder / rel
                if not path.exists() or sha256_file(path) != digest:
                    raise DeepSeeMoEError(f"{path} is missing or damaged (checksum differs); {again}")
        return doc

    def save_table(self, rows: list[dict], markdown: str, findings: list[str] | None = None,
                   draw: Callable[[Path], list[Path]] | None = None) -> None:
        """table.json and table.md, and figures/ drawn by `draw(folder)`; table.json last, so a
        finished study is one whose table.json exists."""
        if draw is not None:
            draw(self.path / FIGURES)
        atomic_write_bytes(self.path / TABLE_MD, markdown.encode())
        atomic_write_json(self.path / TABLE, {"rows": rows, "findings": findings or []})

    # ---- readers (the report) ------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> PostTrainRun:
        run = cls(Path(path))
        if not (run.path / TABLE).exists():
            raise DeepSeeMoEError(f"{run.path} holds no finished post-training study (no {TABLE}); run "
                                  "`deepseemoe post-train` to the end")
        return run

    def settings(self) -> dict:
        return read_json(self.path / SETTINGS, f"remove {self.path} and run `deepseemoe post-train` again")

    def table(self) -> dict:
        return read_json(self.path / TABLE, f"remove {self.path} and run `deepseemoe post-train` again")

    def table_markdown(self) -> str:
        return (self.path / TABLE_MD).read_text()

    def point_names(self) -> list[str]:
        folder = self.path / POINTS
        return sorted(p.name for p in folder.iterdir() if (p / RESULT).exists()) if folder.is_dir() else []

    def figures(self) -> list[Path]:
        return sorted((self.path / FIGURES).glob("*.png"))
