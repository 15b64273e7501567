"""A study directory: a routing run and what other verbs wrote beside it, found from the files alone.

    STUDY/RUN/                      the routing run (runs/routing.py), with its analyses/
    STUDY/checkpoints/*/            routing runs of earlier checkpoints on the same text (saturation)
    STUDY/*/config.yaml + evaluation.json   dictionary runs (runs/dictionary.py) with their maps and graphs
    STUDY/*/ablation.json (+ figures/*.png)  causal checks (`ablate`)
    STUDY/*/removal.json (+ removal.png)     a behaviour removed by ablation (`ablate --target`)
    STUDY/*/wiring.json             modules of the feed-forward neurons' weight graph (`wiring`)
    STUDY/*/comparison.json         the MoE-vs-dense comparison (`compare`)
    STUDY/*/specialists.json        domain specialisation of routing runs against a null (compare/specialists.py)
    STUDY/*/carve.json              the reports of MoEs carved from a dense model (`zoo carve`)
    STUDY/*/attribution.json + graphs/*.json   attribution graphs of prompts (`attribute`), each graph
                                    circuit-tracer's graph JSON, checksummed in attribution.json
    STUDY/*/posttrain.json + table.json   a post-training study (`post-train`, runs/posttrain.py)
    STUDY/*/sweep.json + table.json       a reach sweep (`sweep`, runs/sweep.py)
    run.json's "zoo" folder, report.json    the models' training report, when the zoo trained them

`deepseemoe report` renders whatever of this exists; nothing here is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_write_bytes, atomic_write_json, read_json
from deepseemoe.runs.dictionary import CONFIG, EVALUATION, DictionaryRun
from deepseemoe.runs.explanations import ExplanationStore, stores_in
from deepseemoe.runs.manifest import NAME as MANIFEST
from deepseemoe.runs.posttrain import SETTINGS as POSTTRAIN_SETTINGS
from deepseemoe.runs.posttrain import TABLE as POSTTRAIN_TABLE
from deepseemoe.runs.posttrain import PostTrainRun
from deepseemoe.runs.routing import RoutingRun
from deepseemoe.runs.sweep import SETTINGS as SWEEP_SETTINGS
from deepseemoe.runs.sweep import TABLE as SWEEP_TABLE
from deepseemoe.runs.sweep import SweepRun

FIX = "run the verb that wrote it again"
ABLATION, COMPARISON, REMOVAL, WIRING = "ablation.json", "comparison.json", "removal.json", "wiring.json"
SPECIALISTS, CARVE, ATTRIBUTION = "specialists.json", "carve.json", "attribution.json"


def save_ablation(folder: str | Path, result: dict, draw: Callable[[Path], object] | None = None) -> Path:
    """FOLDER/ablation.json (what `ablate` computed) and FOLDER/figures/ drawn by `draw(figures)`."""
    return _save_result(Path(folder), ABLATION, result, draw, "figures")


def save_removal(folder: str | Path, result: dict, draw: Callable[[Path], object] | None = None) -> Path:
    """FOLDER/removal.json (what `ablate --target` computed) and FOLDER/removal.png drawn by `draw(path)`."""
    return _save_result(Path(folder), REMOVAL, result, draw, "removal.png")


def _save_result(folder: Path, name: str, result: dict, draw: Callable[[Path], object] | None, figures: str) -> Path:
    atomic_write_json(folder / name, result)
    if draw is not None:
        draw(folder / figures)
    return folder / name


def save_comparison(folder: str | Path, result: dict, markdown: str) -> Path:
    """FOLDER/comparison.json (what `compare` computed) and the same table as comparison.md."""
    return _save_with_markdown(Path(folder), COMPARISON, result, markdown)


def save_specialists(folder: str | Path, result: dict, markdown: str) -> Path:
    """FOLDER/specialists.json (`Specialists.to_json()`) and the same table as specialists.md."""
    return _save_with_markdown(Path(folder), SPECIALISTS, result, markdown)


def _save_with_markdown(folder: Path, name: str, result: dict, markdown: str) -> Path:
    atomic_write_json(folder / name, result)
    atomic_write_bytes(folder / name.replace(".json", ".md"), markdown.encode())
    return folder / name


def read_ablation(folder: str | Path) -> dict:
    return read_json(Path(folder) / ABLATION, FIX)


def read_comparison(folder: str | Path) -> dict:
    return read_json(Path(folder) / COMPARISON, FIX)


def read_specialists(folder: str | Path) -> dict:
    return read_json(Path(folder) / SPECIALISTS, FIX)


def read_removal(folder: str | Path) -> dict | None:
    """FOLDER/removal.json, or None when no removal was saved there."""
    path = Path(folder) / REMOVAL
    return read_json(path, FIX) if path.exists() else None


def save_carve(folder: str | Path, reports: dict[str, dict]) -> Path:
    """FOLDER/carve.json: the report.json of each carved model (by label: split, settings), as `zoo carve`
    wrote it, and where its routing run is."""
    return _save_result(Path(folder), CARVE, {"carves": reports}, None, "")


def save_attribution(folder: str | Path, graphs: list[tuple[str, dict, dict]], meta: dict) -> Path:
    """FOLDER/graphs/SLUG.json for each (slug, graph JSON, index entry) and FOLDER/attribution.json: `meta`
    and the entries, each with its file and checksum; written last, so a folder with it is complete."""
    from deepseemoe.runs.manifest import sha256_file

    folder = Path(folder)
    entries = []
    for slug, doc, entry in graphs:
        path = folder / "graphs" / f"{slug}.json"
        atomic_write_json(path, doc)
        entries.append({**entry, "slug": slug, "file": str(path.relative_to(folder)), "sha256": sha256_file(path)})
    for stale in (folder / "graphs").glob("*.json"):  # a graph of an earlier run's prompts
        if stale.stem not in {slug for slug, _, _ in graphs}:
            stale.unlink()
    return _save_result(folder, ATTRIBUTION, {**meta, "graphs": entries}, None, "")


def read_attribution_graph(folder: str | Path, entry: dict) -> dict:
    """The graph JSON of one entry of FOLDER/attribution.json, checked against its checksum."""
    from deepseemoe.runs.manifest import sha256_file

    path = Path(folder) / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise DeepSeeMoEError(f"{path} is missing or damaged (its checksum differs from {ATTRIBUTION}); "
                              "build the graphs again (`deepseemoe demo`, or `deepseemoe attribute`)")
    return read_json(path, FIX)


@dataclass
class DictionaryRunFiles:
    path: Path
    evaluation: dict
    maps: dict[str, dict]  # dictionary name -> maps/NAME/summary.json
    graphs: dict[str, dict] = field(default_factory=dict)  # dictionary name -> graphs/NAME/summary.json

    def graph_figure(self, name: str) -> Path | None:
        """graphs/NAME/layout.png, when `graph` drew one."""
        return DictionaryRun(self.path).graph_figure(name)


def _is_routing_run(path: Path) -> bool:
    return (path / MANIFEST).exists() and (path / "routing").is_dir()


def find_routing_run(path: Path) -> Path:
    """PATH itself when it is a routing run, else the one routing run directly inside it (a study)."""
    if _is_routing_run(path):
        return path
    inside = sorted(p for p in path.iterdir() if _is_routing_run(p)) if path.is_dir() else []
    if len(inside) == 1:
        return inside[0]
    if not inside:
        raise DeepSeeMoEError(f"{path} is neither a routing run nor a study holding one; pass the --out of "
                              "`deepseemoe route` or of `deepseemoe demo` (e.g. runs/demo)")
    raise DeepSeeMoEError(f"{path} holds several routing runs ({', '.join(p.name for p in inside)}); pass the one you mean")


@dataclass
class Result:
    """One result folder beside the routing run (an ablation, a removal, a wiring, a comparison)."""

    folder: Path
    doc: dict
    figures: list[Path] = field(default_factory=list)


@dataclass
class Study:
    run: RoutingRun
    checkpoints: list[RoutingRun] = field(default_factory=list)
    dictionary_runs: list[DictionaryRunFiles] = field(default_factory=list)
    zoo_report: dict | None = None
    explanations: list[ExplanationStore] = field(default_factory=list)  # the run's experts', the dictionaries'
    # the experts described in other models' routing runs inside result folders (a carved MoE's), and
    # those models' dictionary runs (the carved MoE's SAE) with their descriptions: not the study's
    # model, so never shown as its experts or features (the explorer of that routing run shows them)
    other_explanations: list[ExplanationStore] = field(default_factory=list)
    other_dictionary_runs: list[DictionaryRunFiles] = field(default_factory=list)
    # every result folder beside the run, by kind ("ablation", "removal", "wiring", "comparison", "specialists",
    # "carve", "attribution", "posttrain", "sweep"), in name order
    results: dict[str, list[Result]] = field(default_factory=dict)

    # the first folder of each kind: what the explorer's single-result pages show
    def _first(self, kind: str) -> Result | None:
        return (self.results.get(kind) or [None])[0]

    @property
    def ablation(self) -> dict | None:
        return r.doc if (r := self._first("ablation")) else None

    @property
    def ablation_figures(self) -> list[Path]:
        return r.figures if (r := self._first("ablation")) else []

    @property
    def removal(self) -> dict | None:
        return r.doc if (r := self._first("removal")) else None

    @property
    def removal_figure(self) -> Path | None:
        return r.figures[0] if (r := self._first("removal")) and r.figures else None

    @property
    def wiring(self) -> dict | None:
        return r.doc if (r := self._first("wiring")) else None

    @property
    def comparison(self) -> dict | None:
        return r.doc if (r := self._first("comparison")) else None

    @classmethod
    def open(cls, run_dir: str | Path, checkpoint_runs: list[str | Path] | None = None) -> Study:
        """The routing run at `run_dir` (or the one inside the study folder `run_dir`) and what sits
        beside it; `checkpoint_runs` (else the routing runs under STUDY/checkpoints/) are earlier
        checkpoints routed on the same text."""
        run = RoutingRun.open(find_routing_run(Path(run_dir)))  # a study folder names its one routing run
        root = run.run_dir.parent
        if checkpoint_runs is None:
            folder = root / "checkpoints"
            checkpoint_runs = sorted(p for p in folder.iterdir() if (p / "manifest.json").exists()) \
                if folder.is_dir() else []
        study = cls(run, [RoutingRun.open(p) for p in checkpoint_runs])
        study.explanations += list(stores_in(run.run_dir).values())

        def dictionaries_in(folder: Path) -> DictionaryRunFiles | None:
            if not ((folder / CONFIG).exists() and (folder / EVALUATION).exists()):
                return None
            dictionaries = DictionaryRun(folder)
            return DictionaryRunFiles(folder, dictionaries.evaluation(), dictionaries.map_summaries(),
                                      dictionaries.graph_summaries())

        for sub in sorted(p for p in root.iterdir() if p.is_dir() and p != run.run_dir):
            if (found := dictionaries_in(sub)) is not None:
                study.dictionary_runs.append(found)
                study.explanations += list(stores_in(sub).values())
            for kind, name in (("ablation", ABLATION), ("removal", REMOVAL), ("wiring", WIRING),
                               ("comparison", COMPARISON), ("specialists", SPECIALISTS), ("carve", CARVE),
                               ("attribution", ATTRIBUTION)):
                if (sub / name).exists():
                    figures = {"ablation": sorted((sub / "figures").glob("*.png")),
                               "removal": [p for p in [sub / "removal.png"] if p.exists()]}.get(kind, [])
                    study.results.setdefault(kind, []).append(Result(sub, read_json(sub / name, FIX), figures))
            if (sub / POSTTRAIN_SETTINGS).exists() and (sub / POSTTRAIN_TABLE).exists():  # a finished post-training
                pt = PostTrainRun.open(sub)
                study.results.setdefault("posttrain", []).append(
                    Result(sub, {"settings": pt.settings(), **pt.table()}, pt.figures()))
            if (sub / SWEEP_SETTINGS).exists() and (sub / SWEEP_TABLE).exists():  # a finished reach sweep
                sweep = SweepRun.open(sub)
                study.results.setdefault("sweep", []).append(
                    Result(sub, {"settings": sweep.settings(), **sweep.table()}, sweep.figures()))
            if (sub / CARVE).exists():  # the carved models' routing runs and dictionary runs, and what was described
                for split in sorted(p for p in sub.iterdir() if _is_routing_run(p)):
                    study.other_explanations += list(stores_in(split).values())
                for folder in sorted(p for p in sub.iterdir() if p.is_dir() and not _is_routing_run(p)):
                    if (found := dictionaries_in(folder)) is not None:
                        study.other_dictionary_runs.append(found)
                        study.other_explanations += list(stores_in(folder).values())
        zoo = run.meta.get("zoo")
        if zoo and (Path(zoo) / "report.json").exists():
            study.zoo_report = read_json(Path(zoo) / "report.json", "train the zoo models again (--retrain)")
        return study
