"""What to train: the run config of `deepseemoe train` (one YAML file, saved with the results) and
the (source sites → target sites) each coder reads and writes.

A coder entry names a kind and its layers; the sites follow from the kind unless given:

    sae                source = target = `site` (default resid_out) at one layer
    transcoder         block_in → block_out at one layer (skip_transcoder: plus x @ W_skipᵀ)
    router_transcoder  block_in → router_logits at one MoE layer
    crosscoder         `site` at several layers, concatenated (one dictionary over all of them)
    clt                block_in at layers i → block_out at layers i..L-1 (default: every block layer)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path

from deepseemoe.capture.core import Site
from deepseemoe.dictionaries.coder import ACTIVATIONS, CoderConfig, check_ternary
from deepseemoe.dictionaries.trainer import TrainConfig
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import read_yaml_mapping
from deepseemoe.validate import check_fields, known_keys

KINDS = ("sae", "transcoder", "skip_transcoder", "router_transcoder", "crosscoder", "clt")
FORMATS = ("saelens", "sparsify", "circuit_tracer")


@dataclass
class CoderSpec:
    kind: str
    layers: list[int] | str  # or "all"
    name: str = ""
    site: str = "resid_out"  # sae / crosscoder
    activation: str = "topk"
    k: int = 32
    expansion_factor: int = 16
    n_latents: int = 0
    # ReLU: L1 / JumpReLU: L0 coefficient of this coder; unset: the run's train.sparsity_coef, else
    # steered so that L0 approaches k (for TopK/BatchTopK, k is L0 itself)
    sparsity_coef: float | None = None
    ternary: str = ""  # "encoder", "decoder" or "both": ternary weights (coder.py), trained straight-through
    neighbours: int | None = None  # clt: write to the source layer and this many following ones (None: all)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DeepSeeMoEError(f"unknown coder kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise DeepSeeMoEError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        check_ternary(self.ternary, cross_layer=self.kind == "clt")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        # automatic names: kind, then the site when an SAE/crosscoder reads another than resid_out (two
        # SAEs of one layer on different sites must not collide), then the layers: sae_7,
        # sae_block_in_7, transcoder_3, crosscoder_3_7_11, clt_all
        stem = self.kind if self.kind not in ("sae", "crosscoder") or self.site == "resid_out" \
            else f"{self.kind}_{self.site}"
        if self.neighbours is not None:
            if self.kind != "clt" or self.neighbours < 0:
                raise DeepSeeMoEError(f"neighbours: {self.neighbours} — a count ≥ 0 of the following layers a "
                                      "cross-layer transcoder writes to; only for kind clt")
            stem = f"{stem}_w{self.neighbours}"  # two CLTs of other reach in one run keep their names apart
        if self.layers == "all":  # resolved against the model by `resolve_layers`
            self.name = self.name or f"{stem}_all"
            return
        single = self.kind not in ("crosscoder", "clt")
        if single and len(self.layers) != 1:
            raise DeepSeeMoEError(f"a {self.kind} reads one layer; got layers {self.layers} (use one entry per layer)")
        if not self.layers:
            raise DeepSeeMoEError(f"coder {self.name or self.kind} needs at least one layer")
        if not self.name:
            self.name = f"{stem}_{'_'.join(map(str, self.layers))}"

    def resolve_layers(self, n_layers: int, block_layers: list[int], moe_layers: list[int]) -> None:
        """Check the layers against the model; `layers: all` → every layer the kind can read."""
        if self.kind == "router_transcoder" or self.site == "router_logits":
            allowed, what = moe_layers, "an MoE block"
        elif self.kind in ("sae", "crosscoder") and self.site in ("resid_in", "resid_out"):
            allowed, what = list(range(n_layers)), "a decoder layer"
        else:
            allowed, what = block_layers, "an MoE block or MLP"
        if self.layers == "all":
            self.layers = list(allowed)
            self.__post_init__()
        missing = [layer for layer in self.layers if layer not in allowed]
        if missing:
            raise DeepSeeMoEError(f"coder {self.name}: layers {missing} have no {what}; choose from {allowed}")

    def sites(self) -> tuple[list[Site], list[Site]]:
        L = self.layers
        if self.kind in ("sae", "crosscoder"):
            s = [Site(self.site, layer) for layer in L]
            return s, s
        if self.kind == "router_transcoder":
            return [Site("block_in", L[0])], [Site("router_logits", L[0])]
        return [Site("block_in", layer) for layer in L], [Site("block_out", layer) for layer in L]

    def coder_config(self, d_source: int, d_target: int) -> CoderConfig:
        """d_source / d_target: the width of one source / target site."""
        S = len(self.layers)
        sae_like = self.kind in ("sae", "crosscoder")
        n_latents = self.n_latents or self.expansion_factor * d_source * S  # a CLT: per layer × layers
        return CoderConfig(d_in=S * d_source, d_out=None if sae_like else S * d_target, n_latents=n_latents,
                           activation=self.activation, k=self.k, skip=self.kind == "skip_transcoder",
                           n_sites=S, cross_layer=self.kind == "clt", ternary=self.ternary, neighbours=self.neighbours)


@dataclass
class RunSpec:
    model: str
    data: str  # the text: a local file/folder/glob or hf:DATASET (`corpus` in configs of 0.1)
    out: str
    coders: list[CoderSpec]
    tokens: int = 1_000_000  # training tokens per coder
    ctx_len: int | None = None  # None: 256, or the model's position limit when smaller
    batch_size: int = 8  # contexts per model forward
    model_device: str | None = None
    coder_device: str | None = None
    dtype: str | None = None
    device_map: str | None = None  # e.g. "auto": the model spread over devices (model_device then unused)
    field: str = "text"
    domain_field: str | None = None
    trust_remote_code: bool = False
    checkpoint_every: int = 200  # optimizer steps
    formats: list[str] = dc_field(default_factory=list)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    log: list[str] = dc_field(default_factory=list)  # wandb, tensorboard, trackio (local metrics.jsonl always)
    activation_cache: str | None = None  # folder: written on the first run, read (no model forward) after
    distribute: str = "data"  # under torchrun: "data" (each rank its batches) or "coders" (each rank its coders)

    def cache_key(self) -> dict:
        sites = sorted({f"{s.kind}@{s.layer}" for c in self.coders for g in c.sites() for s in g})
        return {"model": self.model, "data": self.data, "ctx_len": self.ctx_len, "batch_size": self.batch_size,
                "dtype": self.dtype, "field": self.field, "sites": sites}

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise DeepSeeMoEError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
        names = [c.name for c in self.coders]
        if len(set(names)) != len(names):
            raise DeepSeeMoEError(f"coder names must be unique; got {names}")
        if not self.coders:
            raise DeepSeeMoEError("the config lists no coders; add at least one under `coders:`")
        if self.distribute not in ("data", "coders"):
            raise DeepSeeMoEError(f"distribute must be 'data' or 'coders', not {self.distribute!r}")
        check_loggers(self.log)

    @property
    def max_steps(self) -> int:
        return max(1, self.tokens // self.train.batch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coders"] = [asdict(c) for c in self.coders]
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        if not isinstance(d, dict):
            raise DeepSeeMoEError(f"the run config must be a mapping of settings, not {type(d).__name__}; see "
                                  "README: Dictionaries")
        d = dict(d)
        if "corpus" in d and "data" not in d:  # the key's name in configs saved by DeepSeeMoE 0.1
            d["data"] = d.pop("corpus")
        known_keys(cls, d, "run config")
        missing = [k for k in ("model", "data", "out", "coders") if not d.get(k)]
        if missing:
            raise DeepSeeMoEError(f"the run config lacks {', '.join(missing)}; see `deepseemoe train --help`")
        if not isinstance(d["coders"], list) or not all(isinstance(c, dict) for c in d["coders"]):
            raise DeepSeeMoEError("run config: `coders` must be a list of mappings, e.g. - {kind: sae, layers: [3]}")
        coders = []
        for i, c in enumerate(d["coders"]):
            where = f"run config, coder {c.get('name') or i}"
            known_keys(CoderSpec, c, where)
            if "kind" not in c or "layers" not in c:
                raise DeepSeeMoEError(f"{where}: needs `kind` and `layers`")
            layers = c["layers"]
            if not (layers == "all" or (isinstance(layers, int) and not isinstance(layers, bool))
                    or (isinstance(layers, list) and all(type(v) is int for v in layers))):
                raise DeepSeeMoEError(f"{where}: `layers` must be a layer index, a list of them or 'all', "
                                      f"not {layers!r}")
            spec = CoderSpec(**c)
            check_fields(spec, where, positive=("k", "expansion_factor"), non_negative=("n_latents", "sparsity_coef"))
            if spec.layers != "all" and any(layer < 0 for layer in spec.layers):
                raise DeepSeeMoEError(f"{where}: layers must be 0 or more, not {spec.layers}")
            coders.append(spec)
        d["coders"] = coders
        train = d.get("train") or {}
        if not isinstance(train, dict):
            raise DeepSeeMoEError("run config: `train` must be a mapping, e.g. {batch_size: 4096}")
        known_keys(TrainConfig, train, "run config, train")
        d["train"] = TrainConfig(**train)
        check_fields(d["train"], "run config, train", positive=("batch_size", "buffer_size", "lr", "dead_after_tokens"),
                     non_negative=("auxk_alpha", "sparsity_coef", "seed"))
        if d["train"].buffer_size < d["train"].batch_size:
            raise DeepSeeMoEError(f"run config, train: buffer_size ({d['train'].buffer_size}) must hold at least one "
                                  f"batch (batch_size {d['train'].batch_size})")
        spec = cls(**d)
        check_fields(spec, "run config", positive=("tokens", "ctx_len", "batch_size", "checkpoint_every"))
        return spec

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RunSpec:
        """The resolved config a `deepseemoe train` run saved in its --out folder."""
        from deepseemoe.runs.dictionary import DictionaryRun

        return cls.from_dict(DictionaryRun.open(run_dir).config())

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunSpec:
        return cls.from_dict(load_yaml_mapping(path))


def load_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file as a dict; one-line refusals for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise DeepSeeMoEError(f"config {path} does not exist; pass a YAML run config (see README: Dictionaries)")
    return read_yaml_mapping(path)


# logger -> (the module it needs, the extra that installs it)
LOGGERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio")}


def check_loggers(names: list[str]) -> None:
    """Every logger in `log` is known and installed: refused when the config is read, before a model
    loads (finding out at the first step costs the whole model load)."""
    import importlib.util

    for name in names:
        if name not in LOGGERS:
            raise DeepSeeMoEError(f"unknown logger {name!r} in `log`; choose from {', '.join(LOGGERS)}")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise DeepSeeMoEError(f"log: {name} is not installed; pip install \"deepseemoe[{extra}]\" (or pip install "
                                  f"{module}), or drop it from `log`")
