"""A dictionary run directory (the --out of `deepseemoe train`): the only code that knows its layout.

    OUT/config.yaml                     the resolved run config, saved by `train`; its last line,
                                        `# sha256: HEX`, checks the text above it (a cut file is refused)
    OUT/checkpoint.safetensors          resumable trainer state, no pickle (rank r>0: checkpoint.rank{r}…)
    OUT/metrics.jsonl                   one line per coder and optimizer step
    OUT/dictionaries/NAME/              config.json (coder config, metadata, sha256 of the weights)
                                        + coder.safetensors
    OUT/exports/FORMAT/…                the coders in SAELens / sparsify / circuit-tracer layouts
    OUT/evaluation.json                 `evaluate`; "inputs" holds the sha256 of every coder it measured
    OUT/maps/NAME/                      `map`: parquet tables, examples.json, summary.json (+ inputs)
    OUT/latents/NAME/                   `latents`: delphi's latent cache
    OUT/steering/NAME/F…_xSCALE.json    `steer`: one file per feature set and scale
    OUT/graphs/NAME/                    `graph`: nodes.parquet, edges.parquet, summary.json (+ inputs),
                                        layout.png

Derived results (evaluation, maps, steering) record the sha256 of the coders they came from and are
refused as stale when a coder changed since (a retrained run in the same folder).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    read_json,
    read_yaml_mapping,
)
from deepseemoe.runs.lock import atomic_dir

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
DICTIONARIES = "dictionaries"
CODER_CONFIG = "config.json"
CODER_WEIGHTS = "coder.safetensors"
EVALUATION = "evaluation.json"
STEERING = "steering"
CONFIG_CHECKSUM = b"# sha256: "
# Names the demo gave its dictionaries before it used train's automatic ones (CHANGELOG, Unreleased): still
# accepted, with a warning, for one release. Old prefix -> new prefix, before the layer number.
RENAMED = (("router_sae_", "sae_block_in_"), ("block_transcoder_", "skip_transcoder_"))
# the tables `map` writes that `graph` reads (features: each feature's top expert)
MAP_TABLES = ("router_attribution", "feature_experts", "expert_composition", "features")


@dataclass
class DictionaryRun:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> DictionaryRun:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise DeepSeeMoEError(f"{path} is not a training run (no {CONFIG}); pass the --out of `deepseemoe train`")
        return cls(path)

    # ---- what `train` writes -------------------------------------------------------------------

    def config(self) -> dict:
        """config.yaml as a mapping, verified against its checksum line (one-line refusal for a
        damaged or cut one: YAML cut at a line end still parses, to a config missing settings)."""
        import hashlib

        path = self.path / CONFIG
        text = path.read_bytes()
        body, _, last = text.rstrip(b"\n").rpartition(b"\n")
        if not last.startswith(CONFIG_CHECKSUM) or \
                last[len(CONFIG_CHECKSUM):].decode(errors="replace") != hashlib.sha256(body + b"\n").hexdigest():
            raise DeepSeeMoEError(f"{path} is damaged or incomplete, or was written before DeepSeeMoE checksummed it "
                                  f"(its last line, `{CONFIG_CHECKSUM.decode()}…`, is missing or does not match the "
                                  "settings above it); train the run again, or copy the folder again")
        return read_yaml_mapping(path)

    def save_config(self, config: dict) -> None:
        """config.yaml: the settings, then the checksum line `config()` verifies."""
        import hashlib

        import yaml

        body = yaml.safe_dump(config, sort_keys=False).encode()
        atomic_write_bytes(self.path / CONFIG, body + CONFIG_CHECKSUM + hashlib.sha256(body).hexdigest().encode()
                           + b"\n")

    def checkpoint(self, rank: int = 0) -> Path:
        return self.path / (CHECKPOINT if rank == 0 else CHECKPOINT.replace(".safetensors", f".rank{rank}.safetensors"))

    def discard_unstarted(self, created: bool) -> None:
        """Remove what a training run that never reached a checkpoint wrote: the folder when the run
        made it, else its config, metrics and logger files (whatever else the folder held stays)."""
        import shutil

        if created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for path in [self.path / CONFIG, *self.path.glob("metrics*.jsonl"), self.path / "tensorboard"]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def metrics(self, rank: int = 0) -> Path:
        return self.path / (METRICS if rank == 0 else f"metrics.rank{rank}.jsonl")

    def coder_dir(self, name: str) -> Path:
        return self.path / DICTIONARIES / name

    def coder_names(self) -> list[str]:
        folder = self.path / DICTIONARIES
        return sorted(p.name for p in folder.iterdir() if (p / CODER_CONFIG).exists()) if folder.is_dir() else []

    def renamed(self, name: str) -> str | None:
        """The current name of dictionary NAME when NAME is one it had in an earlier version and only the
        current one exists here (`router_sae_2` -> `sae_block_in_2`); else None."""
        if (self.coder_dir(name) / CODER_CONFIG).exists() or self.map_dir(name).is_dir():
            return None
        for old, new in RENAMED:
            if re.fullmatch(re.escape(old) + r"\d+", name):
                current = new + name.removeprefix(old)
                if (self.coder_dir(current) / CODER_CONFIG).exists():
                    return current
        return None

    def existing_coder(self, name: str) -> Path:
        folder = self.coder_dir(name)
        if not (folder / CODER_CONFIG).exists():
            raise DeepSeeMoEError(f"no dictionary {name!r} in {self.path / DICTIONARIES}; choose from "
                                  f"{self.coder_names()}")
        return folder

    def coder_digest(self, name: str) -> str:
        doc = read_json(self.existing_coder(name) / CODER_CONFIG, "train or copy the dictionary again")
        if not isinstance(doc, dict) or "sha256" not in doc:
            raise DeepSeeMoEError(f"{self.coder_dir(name) / CODER_CONFIG} is damaged; train or copy it again")
        return str(doc["sha256"])

    def exports(self, fmt: str) -> Path:
        return self.path / "exports" / fmt

    # ---- derived results, each with the coders it came from ---------------------------------------

    def _inputs(self, names: list[str]) -> dict[str, str]:
        return {name: self.coder_digest(name) for name in names}

    def _check_inputs(self, what: Path, inputs: dict, verb: str) -> None:
        for name, digest in (inputs or {}).items():
            if name not in self.coder_names() or self.coder_digest(name) != digest:
                raise DeepSeeMoEError(f"{what} was computed from another version of dictionary {name!r} (stale); "
                                      f"run `deepseemoe {verb}` again")

    def save_evaluation(self, doc: dict) -> Path:
        path = self.path / EVALUATION
        atomic_write_json(path, {**doc, "inputs": self._inputs(sorted(doc["coders"]))})
        return path

    def evaluation(self) -> dict:
        path = self.path / EVALUATION
        doc = read_json(path, f"run `deepseemoe evaluate {self.path}` again")
        self._check_inputs(path, doc.get("inputs", {}), f"evaluate {self.path}")
        return doc

    def map_dir(self, name: str) -> Path:
        return self.path / "maps" / name

    def save_map(self, name: str, tables: dict[str, Any], examples: dict, summary: dict) -> Path:
        """maps/NAME/ written whole: `tables` (file stem -> pyarrow table), examples.json, summary.json."""
        return self._save_derived(self.map_dir(name), name, tables, summary,
                                  lambda tmp: atomic_write_json(tmp / "examples.json", examples))

    def map_table(self, name: str, stem: str) -> dict[str, list]:
        """maps/NAME/STEM.parquet as columns; a missing or damaged table is one line naming the fix."""
        return self._columns(self.map_dir(name) / f"{stem}.parquet", f"map {self.path} --dictionary {name}")

    def _columns(self, path: Path, again: str, columns: list[str] | None = None) -> dict[str, list]:
        """A table of the run as columns; missing, truncated or not parquet: one line, `again` the fix."""
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=columns).to_pydict()
        except Exception as exc:
            raise DeepSeeMoEError(f"{path} cannot be read ({type(exc).__name__}); run `deepseemoe {again}` again") from None

    def map_tables(self, name: str, stems: tuple[str, ...] = MAP_TABLES) -> dict[str, dict[str, list] | None]:
        """The map's tables as columns, by stem; None for a table this map has not (an MoE-less map
        has no routing tables)."""
        return {stem: self.map_table(name, stem) if self.table_path("maps", name, stem) else None for stem in stems}

    def map_examples(self, name: str) -> dict:
        """maps/NAME/examples.json (the top and quantile examples of every feature)."""
        return read_json(self.map_dir(name) / "examples.json", f"run `deepseemoe map {self.path} --dictionary {name}` again")

    def map_files(self, name: str) -> list[Path]:
        """Every table of the map (what a stage that reads it depends on)."""
        return sorted(self.map_dir(name).glob("*.parquet"))

    def table_path(self, kind: str, name: str, stem: str) -> Path | None:
        """maps/NAME/STEM.parquet or graphs/NAME/STEM.parquet (`kind`: "maps" or "graphs"), for a
        reader that queries the file itself (the explorer's DuckDB); None when it is not there."""
        path = (self.map_dir(name) if kind == "maps" else self.graph_dir(name)) / f"{stem}.parquet"
        return path if path.exists() else None

    def map_rows(self, name: str, stem: str, unit: tuple[str, int], columns: list[str] | None = None, *,
                 order: tuple[tuple[str, bool], ...] = (), limit: int | None = None,
                 at_least: tuple[str, int] | None = None) -> list[dict]:
        """The rows of maps/NAME/STEM.parquet of one unit — `unit` = (column, value), e.g. ("feature", 7)
        or ("expert", 3) — as dicts of `columns` (default all), sorted by `order` ((column, descending)
        pairs), `limit` at most, only those whose column `at_least[0]` is ≥ `at_least[1]`; [] when the
        map has no such table. One bounded query: DuckDB reads the row groups that hold the unit."""
        path = self.table_path("maps", name, stem)
        if path is None:
            return []
        names = [unit[0], *(columns or []), *(c for c, _ in order), *([at_least[0]] if at_least else [])]
        if not all(_IDENTIFIER.fullmatch(c) for c in names):
            raise ValueError(f"not column names: {names}")
        sql = (f"SELECT {', '.join(columns) if columns else '*'} FROM read_parquet(?) WHERE {unit[0]} = ?"
               + (f" AND {at_least[0]} >= {int(at_least[1])}" if at_least else "")
               + (" ORDER BY " + ", ".join(f"{c} {'DESC' if desc else 'ASC'}" for c, desc in order) if order else "")
               + (f" LIMIT {int(limit)}" if limit is not None else ""))
        return _duckdb_rows(sql, [str(path), int(unit[1])])

    def graph_table(self, name: str, stem: str, columns: list[str] | None = None) -> dict[str, list]:
        """graphs/NAME/STEM.parquet (nodes, edges) as columns; a missing or damaged table is one line."""
        return self._columns(self.graph_dir(name) / f"{stem}.parquet", f"graph {self.path} --dictionary {name}", columns)

    def graph_figure(self, name: str) -> Path | None:
        path = self.graph_dir(name) / "layout.png"
        return path if path.exists() else None

    def map_summary(self, name: str) -> dict | None:
        """maps/NAME/summary.json, checked against the coder it came from; None when NAME has no map."""
        path = self.map_dir(name) / "summary.json"
        if not path.exists():
            return None
        again = f"map {self.path} --dictionary {name}"
        doc = read_json(path, f"run `deepseemoe {again}` again")
        self._check_inputs(path, doc.get("inputs", {}), again)
        return doc

    def map_summaries(self) -> dict[str, dict]:
        """summary.json of every map, checked against the coders they came from."""
        return self._derived_summaries("maps", "map")

    def graph_dir(self, name: str) -> Path:
        return self.path / "graphs" / name

    def save_graph(self, name: str, tables: dict[str, Any], summary: dict, figure: bytes | None) -> Path:
        """graphs/NAME/ written whole: `tables` (file stem -> pyarrow table), summary.json, layout.png."""
        return self._save_derived(self.graph_dir(name), name, tables, summary,
                                  None if figure is None else lambda tmp: atomic_write_bytes(tmp / "layout.png", figure))

    def graph_summaries(self) -> dict[str, dict]:
        """summary.json of every graph, checked against the coders they came from."""
        return self._derived_summaries("graphs", "graph")

    def _save_derived(self, folder: Path, name: str, tables: dict[str, Any], summary: dict,
                      extra: Callable[[Path], object] | None = None) -> Path:
        """FOLDER written whole (maps/NAME, graphs/NAME): `tables` as parquet, what `extra(tmp)` writes,
        and summary.json recording the sha256 of coder `name`."""
        inputs = self._inputs([name])

        def write(tmp: Path) -> None:
            for stem, table in tables.items():
                atomic_write_table(tmp / f"{stem}.parquet", table)
            if extra is not None:
                extra(tmp)
            atomic_write_json(tmp / "summary.json", {**summary, "inputs": inputs})

        return atomic_dir(folder, write)

    def _derived_summaries(self, sub: str, verb: str) -> dict[str, dict]:
        """summary.json of every SUB/NAME/, refused as stale when its coder changed since `verb` ran."""
        out = {}
        for path in sorted((self.path / sub).glob("*/summary.json")):
            again = f"{verb} {self.path} --dictionary {path.parent.name}"
            doc = read_json(path, f"run `deepseemoe {again}` again")
            self._check_inputs(path, doc.get("inputs", {}), again)
            out[path.parent.name] = doc
        return out

    def latents_dir(self, name: str) -> Path:
        return self.path / "latents" / name

    def save_steering(self, name: str, features: list[int], scale: float, results: list[dict]) -> Path:
        """steering/NAME/f{F,…}_x{SCALE}.json: every feature set and scale keeps its own file."""
        stem = "f" + "-".join(map(str, features)) + f"_x{scale:g}"
        path = self.path / STEERING / name / f"{stem}.json"
        atomic_write_json(path, {"dictionary": name, "features": features, "scale": scale, "results": results,
                                 "inputs": self._inputs([name])})
        return path

    def steering(self, name: str) -> list[dict]:
        """Every `steer` result of dictionary NAME (one per feature set and scale), verified."""
        folder = self.path / STEERING / name
        return [read_json(f, "run `deepseemoe steer` again") for f in sorted(folder.glob("*.json"))] \
            if folder.is_dir() else []


def earlier_names(name: str) -> list[str]:
    """The names dictionary NAME had in earlier versions (`sae_block_in_2` -> [`router_sae_2`])."""
    return [old + name.removeprefix(new) for old, new in RENAMED if re.fullmatch(re.escape(new) + r"\d+", name)]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_local = threading.local()


def _duckdb_rows(sql: str, params: list) -> list[dict]:
    """One DuckDB query on this thread's connection (2 threads each): the rows as dicts."""
    import duckdb

    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect(config={"threads": 2})
    cur = con.execute(sql, params)
    rows = cur.fetchall()
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in rows]
