"""How many neighbouring layers should a cross-layer transcoder write to? `deepseemoe sweep`.

One CLT per reach w (its features of layer i write to layers i..i+w; w = 0 is a set of per-layer
transcoders, `all` every later layer) over the same layers, at equal cost: the same latents per
layer and the same L0 (k per source layer) for every reach. Every reach of a seed trains in one run
on the same activations (cached once, replayed for the other seeds), so that the reaches differ in
nothing but their reach; each seed's run is evaluated on held-out text (`evaluate`: FVU per layer,
spliced ΔCE and KL with all layers replaced at once, dead latents, and the layer spread of the
features). The table gives per reach the mean ± sd over seeds and the *elbow*: the smallest reach
whose FVU is within the seeds' spread of the best reach's — where more neighbours stop paying.

Auto-interpretability (`sweep.autointerp`, off by default): a few live features of each row's
dictionaries (drawn at random, per seed named), explained by an LLM and scored by detection (and
fuzzing) beside the same judge given another feature's description — the shuffled baseline, so a
score means something. The explaining is `explain/`'s (this module cannot import it): the verb
hands `run_sweep` a function that does it for one seed's run (`explain.sweep.seed_scorer`).

Which layer to pick, from measurements on the same held-out text (`layer_profile`), per layer of
the sweep: how much of the next-token loss depends on it (ΔCE with every routed expert of its MoE
block ablated, the causal checks' loss meter and ablation), how specialised its experts are (NMI of
document domain and chosen expert over routing slots, as `stats` defines it, beside the same with
the tokens' domains shuffled: the finite-sample level of no specialisation), and how well a
dictionary of the sweep's fixed size reconstructs it (FVU of the smallest reach, per layer). Each
measure ranks the layers (more loss, more specialisation, lower FVU first) and the table orders
them by their mean rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import torch

from deepseemoe.dictionaries.config import RunSpec
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.measures import apart, over_seeds, plus_minus
from deepseemoe.runs.sweep import SweepRun

SWEEP_KEYS = {"layers", "latents_per_layer", "k", "activation", "neighbours", "seeds", "kinds", "autointerp"}
# sweep.autointerp: how many features per row, on which seeds, read on how much text, judged how, and the
# explainer (explain's backend options: backend, url, model, api_key_env; judge: a second backend to score)
AUTOINTERP_KEYS = {"features", "seeds", "tokens", "scorers", "backend", "url", "model", "api_key_env", "judge"}
AUTOINTERP_SCORERS = ("detection", "fuzz")
# beside the CLTs (whose reach 0 is the per-layer transcoder set), at the same total latents and L0:
# "sae", one SAE per layer on the MoE block's output (the CLTs' targets, read rather than predicted),
# spliced all at once; "crosscoder", one over the block outputs of every sweep layer (FVU only: it
# reads later layers, so it cannot be spliced into one forward)
KINDS = ("clt", "sae", "crosscoder")


@dataclass
class SweepSettings:
    base: dict  # the run config's keys (model, data, tokens, ctx_len, train, …) shared by every seed
    out: str
    layers: list[int]
    latents_per_layer: int
    k: int
    neighbours: list[int | str]
    seeds: list[int] = dc_field(default_factory=lambda: [0, 1, 2])
    activation: str = "topk"
    kinds: list[str] = dc_field(default_factory=lambda: ["clt"])
    eval: str | None = None
    eval_tokens: int = 20_000
    autointerp: dict | None = None  # `check_autointerp`'s: features, seeds, tokens, scorers and the backend

    @classmethod
    def from_dict(cls, raw: dict) -> SweepSettings:
        raw = dict(raw)
        sweep = raw.pop("sweep", None)
        if not isinstance(sweep, dict):
            raise DeepSeeMoEError("the sweep config needs a `sweep:` mapping: layers, latents_per_layer, k, neighbours "
                                  "(and seeds); see README: Which layers, how many neighbours")
        unknown = set(sweep) - SWEEP_KEYS
        if unknown:
            raise DeepSeeMoEError(f"sweep: unknown key(s) {', '.join(sorted(unknown))}; known: "
                                  f"{', '.join(sorted(SWEEP_KEYS))}")
        missing = [k for k in ("layers", "latents_per_layer", "k", "neighbours") if k not in sweep]
        if missing:
            raise DeepSeeMoEError(f"sweep: needs {', '.join(missing)}")
        if "coders" in raw:
            raise DeepSeeMoEError("a sweep config has no `coders:` (the sweep makes them); move the settings under "
                                  "`sweep:`")
        layers = sweep["layers"]
        if not isinstance(layers, list) or len(layers) < 2 or not all(type(v) is int and v >= 0 for v in layers) \
                or sorted(set(layers)) != layers:
            raise DeepSeeMoEError(f"sweep: layers must be 2 or more increasing layer indices, not {layers!r}")
        reach = sweep["neighbours"]
        if not isinstance(reach, list) or not reach:
            raise DeepSeeMoEError("sweep: neighbours must be a list of reaches, e.g. [0, 1, 2, all]")
        for w in reach:
            if not (w == "all" or (type(w) is int and 0 <= w < len(layers))):
                raise DeepSeeMoEError(f"sweep: neighbours {w!r} — each a count from 0 to {len(layers) - 1} (the "
                                      f"{len(layers)} layers' window) or 'all'")
        resolved = [len(layers) - 1 if w == "all" else w for w in reach]
        if len(set(resolved)) != len(resolved):
            raise DeepSeeMoEError(f"sweep: neighbours {reach} name one reach twice ('all' is {len(layers) - 1} over "
                                  f"{len(layers)} layers)")
        seeds = sweep.get("seeds", [0, 1, 2])
        if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise DeepSeeMoEError(f"sweep: seeds must be a list of distinct integers ≥ 0, not {seeds!r}")
        for key in ("latents_per_layer", "k"):
            if type(sweep[key]) is not int or sweep[key] < 1:
                raise DeepSeeMoEError(f"sweep: {key} must be a positive integer, not {sweep[key]!r}")
        if sweep["k"] > sweep["latents_per_layer"]:
            raise DeepSeeMoEError(f"sweep: k={sweep['k']} exceeds latents_per_layer={sweep['latents_per_layer']}; "
                                  "equal L0 cannot be met")
        kinds = sweep.get("kinds", ["clt"])
        if not isinstance(kinds, list) or "clt" not in kinds or len(set(kinds)) != len(kinds) \
                or any(k not in KINDS for k in kinds):
            raise DeepSeeMoEError(f"sweep: kinds must list clt (the reaches compared) and any of sae, crosscoder "
                                  f"once each, not {kinds!r}")
        autointerp = check_autointerp(sweep.get("autointerp"), seeds)
        if not raw.get("out"):
            raise DeepSeeMoEError("the sweep config lacks out")
        out = str(raw.pop("out"))
        ev, ev_tokens = raw.pop("eval", None), raw.pop("eval_tokens", 20_000)
        s = cls(base=raw, out=out, layers=layers, latents_per_layer=sweep["latents_per_layer"], k=sweep["k"],
                neighbours=reach, seeds=seeds, activation=sweep.get("activation", "topk"), kinds=kinds, eval=ev,
                eval_tokens=int(ev_tokens), autointerp=autointerp)
        s.spec(seeds[0], Path(out))  # every run setting checked now, before anything is written
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def name(w: int | str) -> str:
        return f"clt_w{w}" if w != "all" else "clt_all_later"

    def sae_names(self) -> list[str]:
        return [f"sae_block_out_{layer}" for layer in self.layers] if "sae" in self.kinds else []

    CROSSCODER = "crosscoder_block_out"

    def rows_of_coders(self) -> dict[str, list[str]]:
        """Each table row (a reach, or another kind) and its dictionaries."""
        rows = {self.name(w): [self.name(w)] for w in self.neighbours}
        if self.sae_names():
            rows["sae"] = self.sae_names()
        if "crosscoder" in self.kinds:
            rows["crosscoder"] = [self.CROSSCODER]
        return rows

    def coder_names(self) -> list[str]:
        return [name for names in self.rows_of_coders().values() for name in names]

    def spec(self, seed: int, out: Path) -> RunSpec:
        """The dictionary run of one seed: a CLT per reach, at equal latents and L0 (k per source
        layer), and the other kinds at the same totals: an SAE of latents_per_layer and k per layer,
        a crosscoder of latents_per_layer × layers and k × layers."""
        raw = copy.deepcopy(self.base)
        raw["train"] = {**(raw.get("train") or {}), "seed": seed}
        L, F = len(self.layers), self.latents_per_layer
        coders = [{"kind": "clt", "layers": self.layers, "name": self.name(w), "activation": self.activation,
                   "k": self.k, "n_latents": F * L, "neighbours": None if w == "all" else w} for w in self.neighbours]
        coders += [{"kind": "sae", "site": "block_out", "layers": [layer], "name": name, "activation": self.activation,
                    "k": self.k, "n_latents": F} for layer, name in zip(self.layers, self.sae_names(), strict=False)]
        if "crosscoder" in self.kinds:
            coders.append({"kind": "crosscoder", "site": "block_out", "layers": self.layers, "name": self.CROSSCODER,
                           "activation": self.activation, "k": self.k * L, "n_latents": F * L})
        raw.update(out=str(Path(out) / f"seed-{seed}"), activation_cache=str(Path(out) / "activations"), coders=coders)
        return RunSpec.from_dict(raw)


def check_autointerp(raw, seeds: list[int]) -> dict | None:
    """sweep.autointerp resolved: {features, seeds, tokens, scorers, backend, …}, or None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DeepSeeMoEError("sweep: autointerp must be a mapping (features, seeds, tokens, scorers, backend, …)")
    unknown = set(raw) - AUTOINTERP_KEYS
    if unknown:
        raise DeepSeeMoEError(f"sweep: autointerp: unknown key(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(AUTOINTERP_KEYS))}")
    out = {"features": raw.get("features", 8), "seeds": raw.get("seeds", seeds[:1]), "tokens": raw.get("tokens", 8_000),
           "scorers": raw.get("scorers", ["detection"]), "backend": raw.get("backend", "smollm2")}
    for key in ("features", "tokens"):
        if type(out[key]) is not int or out[key] < 1:
            raise DeepSeeMoEError(f"sweep: autointerp: {key} must be a positive integer, not {out[key]!r}")
    if not isinstance(out["seeds"], list) or not out["seeds"] or any(s not in seeds for s in out["seeds"]):
        raise DeepSeeMoEError(f"sweep: autointerp: seeds must be some of the sweep's seeds {seeds}, not "
                              f"{out['seeds']!r}")
    if not isinstance(out["scorers"], list) or not out["scorers"] or \
            any(s not in AUTOINTERP_SCORERS for s in out["scorers"]):
        raise DeepSeeMoEError(f"sweep: autointerp: scorers must list some of {', '.join(AUTOINTERP_SCORERS)}, not "
                              f"{out['scorers']!r}")
    for key in ("url", "model", "api_key_env", "judge"):
        if raw.get(key) is not None:
            out[key] = str(raw[key])
    if out["backend"] == "embedding":
        raise DeepSeeMoEError("sweep: autointerp: backend embedding is a judge, not an explainer; name the explainer "
                              "as backend and set judge: embedding")
    return out


@dataclass
class SweepResult:
    run: SweepRun
    rows: list[dict]
    elbow: str | None
    reused: list[int]
    which_layer: list[dict] = dc_field(default_factory=list)  # `rank_layers`: best first


def _key(settings: SweepSettings) -> str:
    """The settings' identity (not the code's: a sweep killed before an upgrade resumes after it)."""
    import hashlib
    import json

    raw = settings.to_dict()
    del raw["autointerp"]  # scored after training: adding it to a finished sweep retrains nothing
    if raw["kinds"] == ["clt"]:  # the key of a sweep made before `kinds` existed: it still resumes
        del raw["kinds"]
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def check_memory(settings: SweepSettings, width: int) -> None:
    """Refuse, with the estimate, a sweep whose coders (with their gradients and Adam's two moments),
    activation buffer and model would not fit the memory of the coders' device. Every reach of a seed
    trains at once; a CLT keeps its whole decoder whatever its reach (the unused part held at zero)."""
    spec = settings.spec(settings.seeds[0], Path(settings.out))
    L, F = len(settings.layers), settings.latents_per_layer
    params = L * F * width + F * width * L * (L + 1) // 2 + L * (F + width)  # encoders, decoders, biases
    others = (L * (2 * F * width + F + width) if "sae" in settings.kinds else 0) \
        + (2 * F * L * L * width + F * L + L * width if "crosscoder" in settings.kinds else 0)
    coders = (len(settings.neighbours) * params + others) * 4 * 4  # float32 weights, gradients, two moments
    buffer = spec.train.buffer_size * L * 2 * width * 4
    device = spec.coder_device or "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return  # the run itself refuses a device it cannot see
        free, model, where = torch.cuda.mem_get_info(torch.device(device))[0], 0, device
    else:
        free, where = _available_memory(), "this machine"
        folder = Path(str(settings.base.get("model", "")))
        model = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    runtime = 0 if device.startswith("cuda") else RUNTIME_BYTES
    need = coders + buffer + model + runtime
    if free and need > 0.9 * free:
        also = f" and the other kinds' {others / 1e6:,.0f}M" if others else ""
        raise DeepSeeMoEError(f"the sweep needs about {_size(need)} of memory ({len(settings.neighbours)} CLTs "
                              f"of {params / 1e6:,.0f}M parameters{also} with their gradients and optimizer state "
                              f"{_size(coders)}, the activation buffer {_size(buffer)}"
                              + (f", the model {_size(model)}" if model else "")
                              + (f", torch and the library about {runtime / 1e9:.0f} GB" if runtime else "")
                              + f") and {where} has {_size(free)} available; lower latents_per_layer, the "
                              "layers, the reaches or train.buffer_size")


RUNTIME_BYTES = 10**9  # a process with torch and transformers loaded, before any work (measured: 0.5–0.8 GB)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _available_memory() -> int:
    """Bytes the kernel says a new allocation can have (MemAvailable), or 0 where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_disk(settings: SweepSettings, width: int) -> None:
    """Refuse, with the estimate, a sweep whose activation cache would not fit the disk."""
    import shutil

    spec = settings.spec(settings.seeds[0], Path(settings.out))
    need = spec.tokens * len(settings.layers) * 2 * width * 4  # source and target per layer, float32 at most
    folder = Path(settings.out)
    probe = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if need > 0.9 * free:
        raise DeepSeeMoEError(f"the sweep's activation cache needs about {need / 1e9:.1f} GB ({spec.tokens:,} tokens × "
                              f"{len(settings.layers)} layers × 2 sites × {width} dims), and {probe} has "
                              f"{free / 1e9:.1f} GB free; lower `tokens` or the layers, or choose another `out`")


def run_sweep(settings: SweepSettings, *, progress: bool = True, trust_remote_code: bool = False,
              echo=None, autointerp: Callable[[int, Path], dict[str, dict]] | None = None) -> SweepResult:
    """Train and evaluate every seed (reusing finished ones), score the features of the seeds
    `settings.autointerp` names with `autointerp(seed, seed's run folder)` → {dictionary: the
    summary of `explain.pipeline.run_score`}, and write the table."""
    from deepseemoe.dictionaries.evaluate import evaluate_run
    from deepseemoe.dictionaries.training import train_run
    from deepseemoe.runs.dictionary import EVALUATION, DictionaryRun

    if settings.autointerp and autointerp is None:  # refused before anything is trained
        raise DeepSeeMoEError("sweep: autointerp needs an explainer; run it through `deepseemoe sweep`")

    cfg = _text_config(settings.base.get("model", ""), trust_remote_code)
    if cfg is not None:
        n_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        late = [la for la in settings.layers if n_layers and la >= n_layers]
        if late:
            raise DeepSeeMoEError(f"sweep: layers {late} do not exist in {settings.base['model']} ({n_layers} layers: "
                                  f"0–{n_layers - 1})")
        if getattr(cfg, "hidden_size", None):
            check_disk(settings, int(cfg.hidden_size))
            check_memory(settings, int(cfg.hidden_size))
    created = not Path(settings.out).exists()
    run = SweepRun.create(settings.out, settings.to_dict(), _key(settings))
    names = settings.coder_names()
    evaluations, reused = {}, []
    try:
        for seed in settings.seeds:
            folder = run.seed_dir(seed)
            dr = DictionaryRun(folder)
            if (folder / EVALUATION).exists() and sorted(dr.evaluation()["coders"]) == sorted(names):
                evaluations[seed] = dr.evaluation()
                reused.append(seed)
                continue
            spec = settings.spec(seed, run.path)
            if echo:
                echo(f"seed {seed}: {len(names)} dictionaries over layers {settings.layers} ({', '.join(names)})")
            train_run(spec, resume=dr.checkpoint().exists(), progress=progress, trust_remote_code=trust_remote_code)
            doc = evaluate_run(folder, data=settings.eval, tokens=settings.eval_tokens, progress=progress,
                               trust_remote_code=trust_remote_code,
                               together={"sae": settings.sae_names()} if settings.sae_names() else None)
            dr.save_evaluation(doc)
            evaluations[seed] = dr.evaluation()
    except Exception:
        # refused before any seed trained (a setting only the model can check): nothing half-written stays
        if created and not any(DictionaryRun(run.seed_dir(s)).checkpoint().exists() for s in settings.seeds):
            import shutil

            shutil.rmtree(run.path, ignore_errors=True)
        raise
    scores = {s: autointerp(s, run.seed_dir(s)) for s in settings.autointerp["seeds"]} if settings.autointerp else {}
    rows = table_rows(settings, evaluations, scores)
    others = other_rows(settings, evaluations, scores)
    elbow = find_elbow(rows)
    picks = rank_layers(layer_profile(settings, run.path, trust_remote_code=trust_remote_code), rows)
    said = findings(settings, rows, elbow, picks, others)
    from deepseemoe.compare.sweep_figures import sweep_figures

    run.save_table({"rows": rows, "elbow": elbow, "layers": settings.layers, "seeds": settings.seeds,
                    "other_kinds": others, "which_layer": picks, "findings": said},
                   table_markdown(rows, elbow) + others_markdown(others) + layers_markdown(picks) + "\n"
                   + " ".join(said) + "\n",
                   draw=lambda folder: sweep_figures(rows, settings.layers, folder))
    return SweepResult(run, rows, elbow, reused, picks)


@torch.no_grad()
def layer_profile(settings: SweepSettings, out: Path, *, trust_remote_code: bool = False) -> list[dict]:
    """Per sweep layer, on the held-out text: the ΔCE (and KL) of ablating every routed expert of its
    MoE block, and the domain NMI of its routing beside shuffled domains (module docstring)."""
    from deepseemoe.capture.consumers import RoutingRecorder
    from deepseemoe.capture.core import run_capture
    from deepseemoe.data.tokens import token_domains
    from deepseemoe.dictionaries.training import load_for_run, run_batches
    from deepseemoe.interventions.loss import LossMeter
    from deepseemoe.interventions.routing import ablate, route_intervention
    from deepseemoe.measures import mutual_information

    spec = settings.spec(settings.seeds[0], out)
    handle = load_for_run(spec, spec.model_device, trust_remote_code=trust_remote_code)
    batches = list(run_batches(spec, handle, data=settings.eval, max_tokens=settings.eval_tokens))
    moe = [la for la in settings.layers if la in handle.moe_layers]
    recorder = RoutingRecorder(moe)
    domains: list[str] = []
    for b in batches:
        run_capture(handle, b.input_ids, [recorder], attention_mask=b.attention_mask, keep=b.keep)
        domains += [b.domains.get(d) or "none" for d in b.doc.reshape(-1)[b.keep].tolist()]
    codes = {d: i for i, d in enumerate(sorted(set(domains)))}
    dom = np.array([codes[d] for d in domains], dtype=np.int64)
    shuffled = dom[np.random.default_rng(0).permutation(len(dom))]
    meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    profile = []
    for layer in settings.layers:
        row: dict = {"layer": layer, "moe": layer in handle.moe_layers}
        if row["moe"]:
            E = handle.moe_layers[layer].num_experts
            hit = meter.measure(lambda layer=layer, E=E: route_intervention(handle, {layer: ablate(range(E))}))
            row.update(ablation_delta_ce=hit["delta_ce"], ablation_kl=hit["kl"])
            idx = torch.cat([r["idx"][layer] for r in recorder.batches]).long().numpy()  # [T, K]
            K = idx.shape[1]
            for key, labels in (("domain_nmi", dom), ("domain_nmi_shuffled", shuffled)):
                joint = np.zeros((len(codes), E))
                np.add.at(joint, (np.repeat(labels, K), idx.reshape(-1)), 1)
                row[key] = mutual_information(joint)[1] if len(codes) > 1 else None
        profile.append(row)
    return profile


def rank_layers(profile: list[dict], rows: list[dict]) -> list[dict]:
    """The profile with each layer's FVU at the sweep's fixed size (the smallest reach's, per layer),
    the rank of the layer under each measure (1 = best), their mean, ordered by it."""
    smallest = min(rows, key=_reach_order)
    out = [{**p, "fvu": smallest["fvu_per_layer"][i], "fvu_reach": smallest["reach"]} for i, p in enumerate(profile)]
    measures = (("ablation_delta_ce", -1), ("domain_nmi", -1), ("fvu", 1))  # sign: -1 = larger is better
    for key, sign in measures:
        known = sorted((sign * r[key], i) for i, r in enumerate(out) if r.get(key) is not None)
        for rank, (_, i) in enumerate(known, 1):
            out[i][f"{key}_rank"] = rank
    for r in out:
        ranks = [r[f"{k}_rank"] for k, _ in measures if f"{k}_rank" in r]
        r["mean_rank"] = float(np.mean(ranks)) if ranks else None
    return sorted(out, key=lambda r: (r["mean_rank"] is None, r["mean_rank"] or 0, -(r.get("ablation_delta_ce") or 0)))


def _reach_order(row: dict) -> int:
    return int(row["reach"]) if row["reach"] != "all" else 10**9


def findings(settings: SweepSettings, rows: list[dict], elbow: str | None, picks: list[dict],
             others: list[dict] = ()) -> list[str]:
    """Sentences written from the table: which reach reconstructs best and whether the others are
    apart from it (beyond the sum of the two seeds' sds), what the spliced loss says, the elbow,
    how far the features spread, their expert alignment against chance, the layer ranked first, and
    the size all of it was measured at."""
    out = []
    ordered = sorted(rows, key=_reach_order)
    narrow, best = ordered[0], min(rows, key=lambda r: r["fvu"])
    if best is narrow:
        out.append(f"Reach {narrow['reach']} reconstructs best (FVU {plus_minus(best['fvu'], best['fvu_sd'])}): "
                   "writing to more layers does not help at this size.")
    else:
        gap = "apart from" if apart(narrow["fvu"], narrow["fvu_sd"], best["fvu"], best["fvu_sd"]) else "within the spread of"
        out.append(f"Reach {best['reach']} reconstructs best (FVU {plus_minus(best['fvu'], best['fvu_sd'])}), "
                   f"{gap} reach {narrow['reach']} ({plus_minus(narrow['fvu'], narrow['fvu_sd'])}).")
    spliced = [r for r in rows if not np.isnan(r["delta_ce"])]
    if spliced:
        low = min(spliced, key=lambda r: r["delta_ce"])
        agree = "the same reach" if low is best else f"not the reach of the best FVU (reach {best['reach']}: " \
                                                     f"{plus_minus(best['delta_ce'], best['delta_ce_sd'])})"
        out.append(f"With every layer replaced at once, the spliced loss is lowest at reach {low['reach']} (ΔCE "
                   f"{plus_minus(low['delta_ce'], low['delta_ce_sd'])} nats/token), {agree}.")
    out.append(f"The elbow, the smallest reach within the seeds' spread of the best FVU, is reach {elbow}."
               if elbow is not None else "One seed gives no spread, so no elbow is named.")
    wide = ordered[-1]
    if not np.isnan(wide["spread"]):
        out.append(f"At reach {wide['reach']} a feature writes to {wide['spread']:.2f} layers on average and "
                   f"{100 * wide['multi_layer']:.0f}% of the live features to more than one.")
    if not np.isnan(narrow["aligned"]) and not np.isnan(wide["aligned"]):
        out.append(f"Aligned with the experts of layer {settings.layers[0]}: {100 * narrow['aligned']:.0f}% of the "
                   f"features at reach {narrow['reach']}, {100 * wide['aligned']:.0f}% at reach {wide['reach']} "
                   f"(against shuffled routing, chance: {100 * narrow['aligned_shuffled']:.0f}% and "
                   f"{100 * wide['aligned_shuffled']:.0f}%).")
    if picks and picks[0].get("mean_rank") is not None:
        p = picks[0]
        out.append(f"Layer {p['layer']} ranks first to study: ablating its experts costs "
                   f"{p['ablation_delta_ce']:+.3f} nats/token, its domain NMI is {p['domain_nmi']:.3f} (shuffled "
                   f"domains {p['domain_nmi_shuffled']:.3f}), a dictionary of this size reaches FVU {p['fvu']:.3f} there."
                   if p.get("ablation_delta_ce") is not None and p.get("domain_nmi") is not None else
                   f"Layer {p['layer']} ranks first to study.")
    w0 = next((r for r in rows if r["reach"] == "0"), None)
    for o in others:
        if o["kind"] == "sae":
            vs = "" if w0 is None else (f"; the reach-0 transcoders, which predict those outputs from the block "
                                        f"inputs, reach {plus_minus(w0['fvu'], w0['fvu_sd'])}")
            out.append(f"One SAE per layer on the block outputs, at the same latents and L0, reconstructs them to FVU "
                       f"{plus_minus(o['fvu'], o['fvu_sd'])}{vs}; spliced into every layer at once, ΔCE "
                       f"{plus_minus(o['delta_ce'], o['delta_ce_sd'])} nats/token.")
        if o["kind"] == "crosscoder":
            out.append(f"A crosscoder over the block outputs of all {len(settings.layers)} layers, at the same total "
                       f"latents and L0, reaches FVU {plus_minus(o['fvu'], o['fvu_sd'])} (not spliced: it reads "
                       "later layers).")
    scored = [(f"reach {r['reach']}", r) for r in rows] + [(OTHER_LABELS[o["kind"]], o) for o in others]
    scored = [(label, r) for label, r in scored if r.get("detection") is not None and not np.isnan(r["detection"])]
    if scored:
        ai = settings.autointerp or {}
        based = [(label, r) for label, r in scored if not np.isnan(r["detection_shuffled"])]
        beat = [label for label, r in based if r["detection"] > r["detection_shuffled"]]

        def cell(r: dict) -> str:
            base = r["detection_shuffled"]
            return f"{r['detection']:.3f} (" + ("no shuffled baseline: fewer than two usable descriptions" if np.isnan(base)
                                               else f"shuffled descriptions {base:.3f}") + ")"
        out.append(f"Detection by an LLM judge from the features' descriptions ({ai.get('features', '?')} features per "
                   f"row, seed(s) {ai.get('seeds', '?')}; balanced accuracy, 0.5 is chance): "
                   + "; ".join(f"{label} {cell(r)}" for label, r in scored)
                   + f" — the descriptions beat shuffled ones in {len(beat)} of the {len(based)} rows with a baseline.")
    spec = settings.spec(settings.seeds[0], Path(settings.out))
    out.append(f"Measured at {spec.tokens:,} training tokens, {settings.latents_per_layer} latents per layer, "
               f"k = {settings.k}, {len(settings.seeds)} seed(s): the answer of this size, not of every size.")
    return out


def layers_markdown(picks: list[dict]) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["\n## Which layer to pick\n",
             "| layer | ΔCE, experts ablated | domain NMI (shuffled) | FVU at fixed size | ranks (ΔCE, NMI, FVU) | "
             "mean rank |", "|---|---|---|---|---|---|"]
    for r in picks:
        ranks = ", ".join(str(r.get(f"{k}_rank", "–")) for k in ("ablation_delta_ce", "domain_nmi", "fvu"))
        lines.append(f"| {r['layer']} | {f(r.get('ablation_delta_ce'), '.4f')} | {f(r.get('domain_nmi'), '.3f')} "
                     f"({f(r.get('domain_nmi_shuffled'), '.3f')}) | {f(r['fvu'], '.4f')} | {ranks} | "
                     f"{f(r['mean_rank'], '.2f')} |")
    if picks and picks[0]["mean_rank"] is not None:
        lines.append(f"\nLayer {picks[0]['layer']} ranks first over the three measures (ΔCE from ablating every "
                     "routed expert of the layer; NMI of domain and expert over routing slots; FVU of the "
                     f"reach-{picks[0]['fvu_reach']} dictionary at this sweep's size).")
    return "\n".join(lines) + "\n"


def _text_config(model: str, trust_remote_code: bool):
    """The model's (text) config alone, no weights: its layers and width, checked before anything is
    written; None when it cannot be read this way (a tiny:MODEL spec, a hub id offline)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
    except Exception:
        return None


AUTOINTERP_COLUMNS = (("detection", "detection"), ("detection_shuffled", "detection, shuffled"),
                      ("fuzz", "fuzzing"), ("fuzz_shuffled", "fuzzing, shuffled"))


def autointerp_values(settings: SweepSettings, scores: dict[int, dict[str, dict]], row: str) -> dict[str, list]:
    """Per autointerp column, one value per sweep seed (NaN where not scored): the balanced accuracy of
    each of the row's dictionaries over its scored features' examples pooled, with their own
    descriptions and with shuffled ones, averaged over the row's dictionaries (an SAE set's layers)."""
    out = {key: [] for key, _ in AUTOINTERP_COLUMNS}
    for seed in settings.seeds:
        per_coder = [scores[seed][name] for name in settings.rows_of_coders()[row] if name in scores.get(seed, {})]
        for scorer in AUTOINTERP_SCORERS:
            entries = [c["scorers"][scorer] for c in per_coder if scorer in c.get("scorers", {})]
            own = [e["explanation"]["balanced_accuracy"] for e in entries]
            base = [e["shuffled_explanation"]["balanced_accuracy"] for e in entries if e.get("shuffled_explanation")]
            out[scorer].append(float(np.nanmean(own)) if own else np.nan)
            out[f"{scorer}_shuffled"].append(float(np.nanmean(base)) if base else np.nan)
    return out


def shown_columns(columns: tuple, rows: list[dict]) -> list[tuple[str, str]]:
    """The columns, and the autointerp ones that some row has a value in."""
    extra = [(k, label) for k, label in AUTOINTERP_COLUMNS
             if any(r.get(k) is not None and not np.isnan(r[k]) for r in rows)]
    return [*columns, *extra]


COLUMNS = (("fvu", "FVU"), ("delta_ce", "ΔCE"), ("kl", "KL"), ("dead", "dead"), ("spread", "layers per feature"),
           ("multi_layer", "features on > 1 layer"), ("aligned", "aligned with experts"),
           ("aligned_shuffled", "aligned, shuffled routing"))


def table_rows(settings: SweepSettings, evaluations: dict[int, dict], scores: dict | None = None) -> list[dict]:
    """Per reach: mean and sample sd over the seeds of each column, and the FVU of every layer."""
    rows = []
    for w in settings.neighbours:
        name = settings.name(w)
        docs = [evaluations[s]["coders"][name] for s in settings.seeds]
        vals = {"fvu": [d["fvu"] for d in docs], "delta_ce": [d.get("delta_ce", np.nan) for d in docs],
                "kl": [d.get("kl", np.nan) for d in docs], "dead": [d["dead"] for d in docs],
                "spread": [d.get("layer_spread", {}).get("mean", np.nan) for d in docs],
                "multi_layer": [d.get("layer_spread", {}).get("multi_layer_share", np.nan) for d in docs],
                # dictionaries.alignment: the share of live features aligned with the experts of the
                # first layer's MoE block, and the same features against shuffled routing (chance)
                "aligned": [_aligned(d, "trained") for d in docs],
                "aligned_shuffled": [_aligned(d, "shuffled") for d in docs],
                **autointerp_values(settings, scores or {}, name)}
        row = {"reach": str(w), "name": name, "seeds": len(docs), "l0": float(np.mean([d["l0"] for d in docs])),
               "fvu_per_layer": np.mean([d["fvu_per_site"] for d in docs], axis=0).tolist()}
        for key, v in vals.items():
            row[key], row[f"{key}_sd"] = over_seeds(v)
        rows.append(row)
    return rows


OTHER_COLUMNS = (("fvu", "FVU"), ("delta_ce", "ΔCE, all layers spliced"), ("kl", "KL"), ("dead", "dead"))
OTHER_LABELS = {"sae": "SAE per layer, block output", "crosscoder": "crosscoder, block outputs"}  # table, report


def other_rows(settings: SweepSettings, evaluations: dict[int, dict], scores: dict | None = None) -> list[dict]:
    """Per other kind (SAEs per layer as one set; the crosscoder): mean and sample sd over the seeds of
    FVU (the mean over the layers' block outputs, as a CLT's), L0 and dead latents of the whole set,
    and for the SAEs the spliced loss with every layer's SAE in place at once."""
    rows = []
    for kind in [k for k in settings.kinds if k != "clt"]:
        per_layer, vals = [], {"fvu": [], "delta_ce": [], "kl": [], "dead": [], "l0": []}
        for s in settings.seeds:
            doc = evaluations[s]
            if kind == "sae":
                docs = [doc["coders"][n] for n in settings.sae_names()]
                joint = doc.get("together", {}).get("sae", {})
                layer_fvu = [d["fvu"] for d in docs]
                vals["dead"].append(float(np.mean([d["dead"] for d in docs])))
                vals["l0"].append(float(sum(d["l0"] for d in docs)))
                vals["delta_ce"].append(joint.get("delta_ce", np.nan))
                vals["kl"].append(joint.get("kl", np.nan))
            else:
                d = doc["coders"][settings.CROSSCODER]
                layer_fvu = d["fvu_per_site"]
                vals["dead"].append(d["dead"])
                vals["l0"].append(d["l0"])
                vals["delta_ce"].append(np.nan)
                vals["kl"].append(np.nan)
            per_layer.append(layer_fvu)
            vals["fvu"].append(float(np.mean(layer_fvu)))
        vals.update(autointerp_values(settings, scores or {}, kind))
        row = {"kind": kind, "seeds": len(settings.seeds), "l0": float(np.mean(vals.pop("l0"))),
               "n_latents": settings.latents_per_layer * len(settings.layers),
               "fvu_per_layer": np.mean(per_layer, axis=0).tolist()}
        for key, v in vals.items():
            row[key], row[f"{key}_sd"] = over_seeds(v)
        rows.append(row)
    return rows


def others_markdown(others: list[dict]) -> str:
    if not others:
        return ""
    columns = shown_columns(OTHER_COLUMNS, others)
    lines = ["\n## Other kinds at the same total latents and L0\n",
             "| kind | seeds | L0 | " + " | ".join(label for _, label in columns) + " |",
             "|" + "---|" * (len(columns) + 3)]
    for r in others:
        lines.append(f"| {OTHER_LABELS[r['kind']]} | {r['seeds']} | {r['l0']:.1f} | "
                     + " | ".join(plus_minus(r.get(k), r.get(f"{k}_sd")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _aligned(doc: dict, kind: str) -> float:
    share = doc.get("expert_alignment", {}).get(kind, {}).get("aligned_share")
    return np.nan if share is None else share


def find_elbow(rows: list[dict]) -> str | None:
    """The smallest reach whose FVU is within the seeds' spread (the sum of the two sds) of the best
    reach's; None with one seed (no spread to be within)."""
    if any(np.isnan(r["fvu_sd"]) for r in rows):
        return None
    best = min(rows, key=lambda r: r["fvu"])
    for r in sorted(rows, key=_reach_order):
        if not apart(r["fvu"], r["fvu_sd"], best["fvu"], best["fvu_sd"]):
            return r["reach"]
    return best["reach"]


def table_markdown(rows: list[dict], elbow: str | None) -> str:
    columns = shown_columns(COLUMNS, rows)
    head = "| reach | seeds | L0 | " + " | ".join(label for _, label in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 3)]
    for r in rows:
        cells = [plus_minus(r.get(key), r.get(f"{key}_sd")) for key, _ in columns]
        lines.append(f"| {r['reach']} | {r['seeds']} | {r['l0']:.1f} | " + " | ".join(cells) + " |")
    tail = (f"\nElbow: reach {elbow} — the smallest whose FVU is within the seeds' spread of the best.\n"
            if elbow is not None else "\nNo elbow: one seed gives no spread to compare within.\n")
    return "\n".join(lines) + "\n" + tail
