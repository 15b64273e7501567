"""Removing a behaviour by ablation (`deepseemoe ablate --target`), with its side effects measured.

The target is a domain (the predictions made while reading that domain's documents) or a token
set (the predictions made while reading one of those tokens); every other prediction within one
document is off-target (packing's cross-document predictions count for neither, `interventions.loss`).

Units (one kind at a time, all layers pooled), each with its activity a_u(t) ≥ 0 on token t
(`interventions.units.UnitActivity`): experts (the routing weight), expert neurons, dense MLP neurons,
attention heads; and with a dictionary, its features (the feature's activation at the SAE's site)
and, when `graph` ran on it, the modules of its feature–expert graph (a module's specificity is the
mean of its members' — features and experts, each in its own kind's units; removing a module
removes its features and ablates its experts together). Specificity of unit u, on the *selection*
half of the held-out contexts:

    s_u = (mean_target a_u − mean_off a_u) / mean_{u' in u's layer} mean_all a_u'

(the difference of means, in units of the layer's typical activity, so that layers of different
scale compete fairly). The n most specific units of a kind are ablated together — experts by a
zero routing weight (slot kept, no renormalisation), neurons by a zero down-projection input,
heads by a zero slice of the o_proj input, features by removing f_i(x)·d_i from the site (the
SAE's error kept, `steering.FeatureEdit`; at every position of the context) — and ΔCE is measured
on the *evaluation* half, on target and off-target predictions separately. Beside it: n units of the same kind drawn at
random (`draws` times), the same-size choice with no knowledge of the target.

Budget: a share of each kind's units (of all layers): n = round(share · N_kind), at least 1 — so
4 of 64 experts, the same parameters as 512 of their 8,192 neurons, 64 of a dense twin's 1,024
MLP neurons and 1 of 16 heads at share 1/16: every kind and model loses the same fraction of
its capacity (the parameters removed are reported). `units` instead fixes n for every kind.

Selectivity: gap = target ΔCE − off-target ΔCE (nats/token) and ratio = target ΔCE / off-target
ΔCE; the aim is a large target ΔCE with an off-target ΔCE near 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from deepseemoe.data.tokens import split_halves, within_document
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.interventions.loss import LossMeter
from deepseemoe.interventions.routing import ablate, route_intervention
from deepseemoe.interventions.units import (
    UnitActivity,
    by_layer,
    zero_expert_neurons,
    zero_layer_heads,
    zero_mlp_neurons,
)
from deepseemoe.models.experts import fused_expert_width, has_fused_layout
from deepseemoe.models.handle import ModelHandle

KINDS = ("expert", "expert_neuron", "mlp_neuron", "attention_head", "feature", "module")
TARGET, OTHER = "target", "off_target"


@dataclass(frozen=True)
class Target:
    """What to remove: `domain` (documents whose domain field equals it) or `token_ids`."""

    label: str
    domain: str | None = None
    token_ids: frozenset[int] = field(default_factory=frozenset)

    @staticmethod
    def check(text: str) -> tuple[str, str, list[str]]:
        """(kind, rest, items) of a --target, refused when it names nothing or an unknown kind (no model
        needed: the command checks this before loading one)."""
        kind, sep, rest = text.partition(":")
        if not sep:
            kind, rest = "domain", text
        items = [s for s in rest.split(",") if s]
        if kind not in ("domain", "tokens", "ids"):
            raise DeepSeeMoEError(f"--target {text!r}: unknown kind {kind!r}; give domain:NAME, tokens:A,B or ids:1,2")
        if not items:
            raise DeepSeeMoEError(f"--target {text!r} names nothing; give domain:NAME, tokens:A,B or ids:1,2")
        return kind, rest, items

    @classmethod
    def parse(cls, text: str, tokenizer) -> Target:
        """`domain:NAME` (or a bare NAME), `tokens:A,B,…` (vocabulary entries, else the tokens of the
        text), or `ids:1,2,…`."""
        kind, rest, items = cls.check(text)
        if kind == "domain":
            return cls(label=f"domain {rest}", domain=rest)
        if kind == "ids":
            try:
                ids = frozenset(int(s) for s in items)
            except ValueError:
                raise DeepSeeMoEError(f"--target {text!r}: ids must be integers, e.g. ids:17,42") from None
            bad = sorted(i for i in ids if not 0 <= i < len(tokenizer))
            if bad:
                raise DeepSeeMoEError(f"--target {text!r}: ids {bad} are outside the vocabulary (0..{len(tokenizer) - 1})")
            return cls(label=f"tokens {sorted(ids)}", token_ids=ids)
        if kind == "tokens":
            ids: set[int] = set()
            vocab = tokenizer.get_vocab()
            for s in items:
                ids.update([vocab[s]] if s in vocab else tokenizer.encode(s, add_special_tokens=False))
            if not ids:
                raise DeepSeeMoEError(f"--target {text!r} tokenises to nothing")
            return cls(label=f"tokens {','.join(items)}", token_ids=frozenset(ids))
        raise AssertionError(kind)  # `check` admits no other kind

    def hits(self, batch) -> torch.Tensor:
        """[B, S] bool: the tokens that belong to the target (read tokens, BOS and padding never)."""
        real = batch.attention_mask.bool() & (batch.pos >= 0)
        if self.domain is not None:
            docs = [d for d, name in batch.domains.items() if name == self.domain]
            return real & torch.isin(batch.doc, torch.tensor(docs, dtype=batch.doc.dtype))
        return real & torch.isin(batch.input_ids, torch.tensor(sorted(self.token_ids), dtype=batch.input_ids.dtype))

    def classes(self, batch) -> torch.Tensor:
        """[B·S] 1 on target tokens, 0 elsewhere (what `UnitActivity` sums by)."""
        return self.hits(batch).reshape(-1).long()

    def labels(self, batch) -> list[str]:
        """[B·(S-1)] the class of each prediction, by the token read; "" when it counts for neither."""
        read, within = self.hits(batch)[:, :-1], within_document(batch)
        hit, other = read & within, ~read & within
        out = np.where(hit.numpy(), TARGET, np.where(other.numpy(), OTHER, ""))
        return out.reshape(-1).tolist()


@dataclass
class Dictionary:
    """A single-site SAE of the model, whose features are units too."""

    name: str
    coder: object  # dictionaries.coder.Coder
    site: object  # capture.core.Site
    modules: dict[int, list[str]] | None = None  # graphs/NAME: module -> its nodes ("f12", "E3")
    graph_layer: int | None = None  # the MoE layer of the graph's experts


@dataclass
class Units:
    """All units of one kind in a model: (layer, unit) pairs, each one's parameters, and how to ablate a set."""

    kind: str
    pairs: list[tuple[int, int]]
    params_each: float  # modules: the mean over modules
    ablate: Callable[[list[tuple[int, int]]], contextlib.AbstractContextManager]


def unit_inventory(handle: ModelHandle, kinds: tuple[str, ...] = KINDS, dictionary: Dictionary | None = None,
                   layers: list[int] | None = None) -> dict[str, Units]:
    """The unit kinds this model has (of `kinds`); features only with a `dictionary`; with `layers`,
    only the units in those layers (a kind with none there is left out)."""
    def kept(la: int) -> bool:
        return layers is None or la in layers

    out: dict[str, Units] = {}
    moes = {la: m for la, m in handle.moe_layers.items() if kept(la)}
    if "expert" in kinds and moes:
        per = np.mean([_params(m.experts) / m.num_experts for m in moes.values()])
        out["expert"] = Units("expert", [(la, e) for la, m in moes.items() for e in range(m.num_experts)], per,
                              lambda chosen: route_intervention(handle, by_layer(chosen, ablate)))
    if "expert_neuron" in kinds and moes and all(has_fused_layout(m.experts) for m in moes.values()):
        width = {la: fused_expert_width(m.experts) for la, m in moes.items()}
        per = np.mean([_params(m.experts) / (m.num_experts * width[la]) for la, m in moes.items()])
        out["expert_neuron"] = Units("expert_neuron", [(la, u) for la, m in moes.items()
                                                       for u in range(m.num_experts * width[la])], per,
                                     lambda chosen: zero_expert_neurons(handle, chosen, width))
    mlps = {la: m for la, m in handle.dense_mlps.items() if kept(la)}
    if "mlp_neuron" in kinds and mlps:
        per = np.mean([_params(m.module) / m.num_neurons for m in mlps.values()])
        out["mlp_neuron"] = Units("mlp_neuron", [(la, u) for la, m in mlps.items() for u in range(m.num_neurons)], per,
                                  lambda chosen: zero_mlp_neurons(handle, chosen))
    if "attention_head" in kinds:
        heads = {la: found for la in range(handle.num_layers)
                 if kept(la) and (found := handle.attention_output(la)) is not None}
        if heads:
            attn = [_params(handle.attention_module(la)) / h for la, (_, h) in heads.items()]
            out["attention_head"] = Units("attention_head", [(la, u) for la, (_, h) in heads.items() for u in range(h)],
                                          float(np.mean(attn)), lambda chosen: zero_layer_heads(heads, chosen))
    if "feature" in kinds and dictionary is not None and kept(dictionary.site.layer):
        from deepseemoe.causal.steering import FeatureEdit

        d = dictionary
        FeatureEdit(handle, d.coder, d.site, 0, 0.0)  # refuses what it cannot edit, before any work
        per = _feature_params(d)
        out["feature"] = Units("feature", [(d.site.layer, f) for f in range(d.coder.cfg.n_latents)], per,
                               lambda chosen: FeatureEdit(handle, d.coder, d.site, [f for _, f in chosen], 0.0))
    if "module" in kinds and dictionary is not None and dictionary.modules and handle.is_moe \
            and kept(dictionary.graph_layer):
        d = dictionary
        moe = handle.moe_layers[d.graph_layer]
        expert_params = _params(moe.experts) / moe.num_experts
        sizes = [sum(expert_params if n.startswith("E") else _feature_params(d) for n in nodes)
                 for nodes in d.modules.values()]
        out["module"] = Units("module", [(d.graph_layer, m) for m in sorted(d.modules)], float(np.mean(sizes)),
                              lambda chosen: _remove_modules(handle, d, [m for _, m in chosen]))
    return out


def _feature_params(d: Dictionary) -> float:
    """One feature's parameters: its encoder column, decoder row and bias."""
    return float(2 * d.coder.cfg.d_in + 1)


@contextlib.contextmanager
def _remove_modules(handle: ModelHandle, d: Dictionary, modules: list[int]):
    """Remove the modules' features (FeatureEdit, scale 0) and ablate their experts, together."""
    from deepseemoe.causal.steering import FeatureEdit

    nodes = [n for m in modules for n in d.modules[m]]
    features = [int(n[1:]) for n in nodes if n.startswith("f")]
    experts = [int(n[1:]) for n in nodes if n.startswith("E")]
    with contextlib.ExitStack() as stack:
        if features:
            stack.enter_context(FeatureEdit(handle, d.coder, d.site, features, 0.0))
        if experts:
            stack.enter_context(route_intervention(handle, {d.graph_layer: ablate(experts)}))
        yield


def module_specificity(d: Dictionary, feature_score: np.ndarray, expert_score: np.ndarray) -> np.ndarray:
    """Per module (sorted ids): the mean specificity of its members."""
    out = []
    for m in sorted(d.modules):
        vals = [expert_score[int(n[1:])] if n.startswith("E") else feature_score[int(n[1:])] for n in d.modules[m]]
        out.append(float(np.mean(vals)) if vals else 0.0)
    return np.array(out)


def specificity(mass: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """mass [U, 2] activity summed over off-target (0) and target (1) tokens, counts [2] → s [U]."""
    mean = mass / np.maximum(counts, 1)[None, :]
    overall = mass.sum(1) / max(counts.sum(), 1)
    scale = overall.mean()
    return (mean[:, 1] - mean[:, 0]) / scale if scale > 0 else np.zeros(len(mass))


def remove_target(handle: ModelHandle, batches: list, target: Target, *, share: float | None = None,
                  units: int | None = None, kinds: tuple[str, ...] = KINDS, draws: int = 3, seed: int = 0,
                  progress: bool = False, label: str = "model", dictionary: Dictionary | None = None,
                  layers: list[int] | None = None) -> dict:
    """For each unit kind: the most specific units ablated together vs `draws` random same-size sets,
    target vs off-target ΔCE on the evaluation half (module docstring). `share` is the budget, a share
    of each kind's units; `units` fixes the count instead; `layers`: only units in those layers."""
    if (share is None) == (units is None):
        raise ValueError("give exactly one of share and units")
    inventory = unit_inventory(handle, kinds, dictionary, layers)
    if not inventory:
        where = f" in layers {', '.join(map(str, layers))}" if layers is not None else ""
        raise DeepSeeMoEError(f"{handle.name} has none of the unit kinds {', '.join(kinds)}{where}; "
                              "choose kinds (and layers) it has")
    select, evaluate = split_halves(batches)
    counts, mass = _activity(handle, select, target, "expert_neuron" in inventory, progress, label)
    if "feature" in inventory or "module" in inventory:
        mass["feature"] = {dictionary.site.layer: _feature_activity(handle, dictionary, select, target)}
    if counts[1] == 0:
        raise DeepSeeMoEError(f"no token of the selection half belongs to the target ({target.label}); "
                              "give more --tokens, or a target that occurs in --data")
    meter = LossMeter(handle, evaluate, [target.labels(b) for b in evaluate])
    base = {name: int(sum(int(m.sum()) for m in meter_masks(meter, name))) for name in (TARGET, OTHER)}
    if base[TARGET] == 0:
        raise DeepSeeMoEError(f"no prediction of the evaluation half reads the target ({target.label}); "
                              "give more --tokens")
    g = np.random.default_rng(seed)
    from deepseemoe.progress import progress_bar

    bar = progress_bar(disable=not progress, unit="ablations")
    task = bar.add_task(f"{label}: removing {target.label}", total=len(inventory) * (1 + draws))
    rows = {}
    with bar:
        for kind, inv in inventory.items():
            if kind == "module":
                score = module_specificity(dictionary, specificity(mass["feature"][dictionary.site.layer], counts),
                                           specificity(mass["expert"][dictionary.graph_layer], counts))
            else:
                score = np.concatenate([specificity(mass[kind][la], counts)
                                        for la in sorted({la for la, _ in inv.pairs})])
            n = units if units is not None else max(1, round(share * len(inv.pairs)))
            n = min(n, len(inv.pairs))
            order = np.argsort(-score, kind="stable")[:n]
            chosen = [inv.pairs[i] for i in order]
            res = _split(meter.measure(lambda inv=inv, chosen=chosen: inv.ablate(chosen)))
            bar.advance(task)
            rand = []
            for _ in range(draws):
                pick = [inv.pairs[i] for i in g.choice(len(inv.pairs), size=n, replace=False)]
                rand.append(_split(meter.measure(lambda inv=inv, pick=pick: inv.ablate(pick))))
                bar.advance(task)
            rows[kind] = {"units": n, "of": len(inv.pairs), "params_removed": float(n * inv.params_each),
                          "chosen": [{"layer": la, "unit": u, "specificity": float(score[i])}
                                     for (la, u), i in zip(chosen, order, strict=True)],
                          "selected": res, "random": _mean_rows(rand), "random_draws": rand}
    return {"model": handle.name, "kinds": rows, "select_tokens": {TARGET: int(counts[1]), OTHER: int(counts[0])},
            "evaluate_predictions": base}


def meter_masks(meter: LossMeter, name: str) -> Iterator[torch.Tensor]:
    for masks in meter.domain_masks:
        if name in masks:
            yield masks[name]


def _activity(handle, batches, target, expert_neurons, progress, label):
    from deepseemoe.progress import track

    device = next(handle.model.parameters()).device
    acts = UnitActivity(handle, 2, expert_neurons)
    counts = np.zeros(2)
    for b in track(batches, f"{label}: unit activity (selection half)", disable=not progress, unit="batches"):
        keep = b.keep.to(device)
        classes = target.classes(b)[b.keep].to(device)
        counts += np.bincount(classes.cpu().numpy(), minlength=2)
        acts.run(b.input_ids.to(device), b.attention_mask.to(device), keep, classes)
    return counts, acts.mass


@torch.no_grad()
def _feature_activity(handle: ModelHandle, d: Dictionary, batches: list, target: Target) -> np.ndarray:
    """[F, 2] the dictionary's feature activations summed over off-target (0) and target (1) tokens."""
    from deepseemoe.interventions.sites import rewrite_site

    coder = d.coder.folded()
    device = next(handle.model.parameters()).device
    mass = torch.zeros(coder.cfg.n_latents, 2, dtype=torch.float64)
    for b in batches:
        keep, classes = b.keep, target.classes(b)[b.keep]
        onehot = torch.nn.functional.one_hot(classes, 2).double()

        def see(h, keep=keep, onehot=onehot):
            x = h.reshape(-1, h.shape[-1]).to(coder.b_dec.device, torch.float32)[keep.to(coder.b_dec.device)]
            mass.add_(coder.encode(x).double().cpu().T @ onehot)
            return h
        hook = rewrite_site(handle, d.site, see)
        try:
            handle.model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
        finally:
            hook.remove()
    return mass.numpy()


def _split(res: dict) -> dict:
    by = res["by_domain"]
    t, o = by.get(TARGET, float("nan")), by.get(OTHER, float("nan"))
    return {"target": t, "off_target": o, "gap": t - o, "ratio": t / o if o > 0 else None, "kl": res["kl"]}


def _mean_rows(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("target", "off_target", "gap", "kl")}
    out["ratio"] = out["target"] / out["off_target"] if out["off_target"] > 0 else None
    return out


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_budget(budget: float | None) -> None:
    """Refuse a budget that is not a share in (0, 1] (the command checks it before loading a model)."""
    if budget is not None and not 0 < budget <= 1:
        raise DeepSeeMoEError(f"--budget {budget} must be a share of each kind's units in (0, 1]")


def default_budget(handle: ModelHandle) -> float:
    """One expert's share of an MoE's experts (1/E); 1/16 for a dense model."""
    return 1 / max((m.num_experts for m in handle.moe_layers.values()), default=16)


def removal_study(sides: list[tuple[str, ModelHandle, list]], target: str, *, budget: float | None = None,
                  units: int | None = None, kinds: tuple[str, ...] = KINDS, draws: int = 3, seed: int = 0,
                  progress: bool = False, dictionary: Dictionary | None = None,
                  layers: list[int] | None = None) -> dict:
    """`remove_target` on each (label, model, batches) at one budget: `budget` is the share of each
    kind's units removed (default `default_budget` of the first model), the same for every model;
    `units` fixes the count of units per kind instead. `dictionary` (an SAE of the first model) adds
    its features as a kind. `layers`: only units in these layers, in every model (a carved MoE's
    band and the same layers of its dense twin)."""
    check_budget(budget)
    first = sides[0][1]
    share = None if units is not None else (budget if budget is not None else default_budget(first))
    parsed = Target.parse(target, first.require_tokenizer())
    models = {}
    for label, handle, batches in sides:
        mine = Target.parse(target, handle.require_tokenizer())
        models[label] = remove_target(handle, batches, mine, share=share, units=units, kinds=kinds, draws=draws,
                                      seed=seed, progress=progress, label=label,
                                      dictionary=dictionary if handle is first else None, layers=layers)
    return {"target": {"label": parsed.label, "domain": parsed.domain, "token_ids": sorted(parsed.token_ids)},
            "budget": {"share": share, "units": units}, "draws": draws, "seed": seed,
            "layers": sorted(layers) if layers is not None else None,
            "dictionary": dictionary.name if dictionary is not None else None,
            "models": models}


def load_dictionary(run_dir, name: str) -> Dictionary:
    """Coder `name` of a dictionary run, its site, and the modules of its graph when `graph` ran on it."""
    from deepseemoe.capture.core import Site
    from deepseemoe.dictionaries.formats import load_run_dictionary
    from deepseemoe.runs.dictionary import DictionaryRun

    coder, meta = load_run_dictionary(run_dir, name)
    run = DictionaryRun.open(run_dir)
    modules = layer = None
    summary = run.graph_summaries().get(name)
    if summary is not None:
        nodes = run.graph_table(name, "nodes", columns=["node", "module"])
        modules = {}
        for node, module in zip(nodes["node"], nodes["module"], strict=True):
            if module is not None:
                modules.setdefault(int(module), []).append(node)
        layer = int(summary["layer"])
    return Dictionary(name, coder, Site(*meta["source"][0]), modules, layer)
