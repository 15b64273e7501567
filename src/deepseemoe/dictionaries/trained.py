"""A finished training run opened for reading: its settings, its model, its coders with what they read
and write, its text — the one preamble of every verb that uses trained dictionaries (`evaluate`, `map`,
`latents`, `steer`, `attribute`, `explain`).

A device given here is this command's, for the model and the coders alike; the saved config is left
as it is (the run was trained where it was trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deepseemoe.capture.core import Site
from deepseemoe.dictionaries.coder import Coder
from deepseemoe.dictionaries.config import RunSpec
from deepseemoe.dictionaries.formats import load_run_dictionary
from deepseemoe.models.handle import ModelHandle
from deepseemoe.runs.dictionary import DictionaryRun


@dataclass(frozen=True)
class CoderRecord:
    """What a trained coder's config says it is: its kind, the sites it reads and writes (in order; a
    crosscoder's or CLT's several), its layers. `meta` is the stored mapping whole, for the exchange
    formats and the functions that take (coder, meta) pairs (attribution, splicing)."""

    name: str
    kind: str
    sources: tuple[Site, ...]
    targets: tuple[Site, ...]
    layers: tuple[int, ...]
    meta: dict = field(repr=False, hash=False, compare=False)

    @classmethod
    def of(cls, name: str, meta: dict) -> CoderRecord:
        return cls(name, str(meta["kind"]), tuple(Site(k, la) for k, la in meta["source"]),
                   tuple(Site(k, la) for k, la in meta["target"]), tuple(int(la) for la in meta["layers"]), meta)


@dataclass
class TrainedRun:
    path: Path
    spec: RunSpec
    run: DictionaryRun
    trust_remote_code: bool = False
    _handle: ModelHandle | None = field(default=None, repr=False)
    _batches: dict[tuple, list] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, run_dir: str | Path, *, device: str | None = None, device_map: str | None = None,
             dtype: str | None = None, trust_remote_code: bool = False) -> TrainedRun:
        """`trust_remote_code`: the current command line's grant (a run's config never grants it)."""
        run = DictionaryRun.open(run_dir)
        spec = RunSpec.from_run_dir(run.path)
        if device:
            spec.model_device = spec.coder_device = device
        if device_map:
            spec.device_map = device_map
        if dtype:
            spec.dtype = dtype
        return cls(run.path, spec, run, trust_remote_code)

    @property
    def coder_device(self) -> str:
        return self.spec.coder_device or "cpu"

    def coder(self, name: str) -> tuple[Coder, CoderRecord]:
        """The coder `name` (checksum verified) on this command's coder device, and its record."""
        coder, meta = load_run_dictionary(self.path, name, device=self.coder_device)
        return coder, CoderRecord.of(name, meta)

    def coders(self, names: list[str] | None = None) -> dict[str, tuple[Coder, CoderRecord]]:
        """The coders `names` (default: every coder of the run), in that order."""
        return {name: self.coder(name) for name in (self.run.coder_names() if names is None else names)}

    def model(self) -> ModelHandle:
        """The run's model on this command's device, loaded once."""
        if self._handle is None:
            from deepseemoe.dictionaries.training import load_for_run

            self._handle = load_for_run(self.spec, self.spec.model_device, trust_remote_code=self.trust_remote_code)
        return self._handle

    def batches(self, *, data: str | None = None, batch_size: int | None = None, tokens: int | None = None) -> list:
        """Packed batches (data.tokens.PackedBatch) of the run's text, or of `data` read with the run's
        field settings; packed once per (data, batch_size, tokens) (the demo maps each dictionary on the
        same text). Read them, do not change them."""
        from deepseemoe.dictionaries.training import run_batches

        key = (data, batch_size, tokens)
        if key not in self._batches:
            self._batches[key] = list(run_batches(self.spec, self.model(), data=data, batch_size=batch_size,
                                                  max_tokens=tokens))
        return self._batches[key]
