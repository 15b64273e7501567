"""`deepseemoe explain` / `score`: units from a dictionary of a training run or from the experts of
one layer of a routing run, explained and scored through one backend, saved in an
`ExplanationStore` (runs/explanations.py).

Features: the text is the run's (or --data), its kept tokens in their contexts; a feature's
activation is the coder's latent. Experts: the routing run's tokens in their documents; an
expert's activation on a token is its gate weight when the token is routed to it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.explain.backends import ChatBackend
from deepseemoe.explain.explainer import NO_DESCRIPTION, UNPARSED, Prompts, explain
from deepseemoe.explain.scorers import (
    detection_items,
    fuzz_items,
    metrics,
    predictions_metrics,
    routing_items,
    score_items,
    shuffled,
    versus_shuffled,
)
from deepseemoe.explain.units import (
    Corpus,
    Example,
    Sampler,
    TokenExample,
    UnitExamples,
    routing_examples,
    token_baseline,
)
from deepseemoe.runs.explanations import ExplanationStore

# a feature is explained and scored only if it fires on at least this many tokens of the text
MIN_FIRINGS = 8


def feature_source(run_dir: Path, name: str, *, data: str | None, tokens: int, features: list[int] | int,
                   batch_size: int = 8, device: str | None = None, trust_remote_code: bool = False
                   ) -> tuple[Corpus, np.ndarray, list[int], dict[int, str]]:
    """(corpus, activations [N, U], the feature ids, MoE context per feature)."""
    corpus, per = feature_sources(run_dir, {name: features}, data=data, tokens=tokens, batch_size=batch_size,
                                  device=device, trust_remote_code=trust_remote_code)
    return (corpus, *per[name])


def feature_sources(run_dir: Path, features: dict[str, list[int] | int], *, data: str | None, tokens: int,
                    batch_size: int = 8, device: str | None = None, trust_remote_code: bool = False,
                    sample_seed: int | None = None, skip_quiet: bool = False
                    ) -> tuple[Corpus, dict[str, tuple[np.ndarray, list[int], dict]]]:
    """The features of several dictionaries of one run read on one pass over the text: (corpus,
    {name: (activations [N, U], the feature ids, MoE context per feature)}). `features[name]`: ids, or
    N — the first N that fire on MIN_FIRINGS tokens, or with `sample_seed` N of them drawn at random
    (a dictionary's first latents are not a sample of it: a CLT's are all of its first layer).
    A dictionary none of whose features fires often enough is refused, or with `skip_quiet` left out."""
    import torch

    from deepseemoe.data.token_text import token_texts
    from deepseemoe.dictionaries.stream import model_stream
    from deepseemoe.dictionaries.trained import TrainedRun

    trained = TrainedRun.open(run_dir, device=device, trust_remote_code=trust_remote_code)
    coders = trained.coders(list(features))
    handle = trained.model()
    tokenizer = handle.require_tokenizer()
    pairs = {name: (list(record.sources), list(record.sources[:1])) for name, (_, record) in coders.items()}
    ids, lengths, lat_parts = [], [], {name: [] for name in features}
    for packed in trained.batches(data=data, batch_size=batch_size, tokens=tokens):
        got = next(model_stream(handle, [packed], pairs, device=next(iter(coders.values()))[0].b_dec.device))
        with torch.no_grad():
            for name, (x, _) in got.items():
                lat_parts[name].append(coders[name][0].encode(x.float()).cpu())
        keep = packed.keep.reshape(packed.input_ids.shape)
        for row in range(keep.shape[0]):  # one sequence per document piece: windows never join two documents
            kept_ids, kept_doc = packed.input_ids[row][keep[row]].numpy(), packed.doc[row][keep[row]].numpy()
            if len(kept_ids):
                ids.append(kept_ids)
                cuts = np.flatnonzero(np.diff(kept_doc)) + 1
                lengths += np.diff(np.concatenate([[0], cuts, [len(kept_ids)]])).tolist()
    if not ids:
        raise DeepSeeMoEError("no text to explain on; give more --tokens or other --data")
    per = {}
    for name, want in features.items():
        latents = torch.cat(lat_parts[name])
        live = torch.nonzero((latents > 0).sum(0) >= MIN_FIRINGS).squeeze(1).tolist()
        if isinstance(want, int) and sample_seed is not None:
            rng = np.random.default_rng(sample_seed)
            chosen = sorted(int(f) for f in rng.choice(live, size=min(want, len(live)), replace=False)) if live else []
        elif isinstance(want, int):
            chosen = live[:want]
        else:
            bad = [f for f in want if not 0 <= f < latents.shape[1]]
            if bad:
                raise DeepSeeMoEError(f"features {bad} do not exist in {name} ({latents.shape[1]} latents)")
            chosen = list(want)
        if not chosen and skip_quiet:
            continue
        if not chosen:
            raise DeepSeeMoEError(f"no feature of {name} fires on at least {MIN_FIRINGS} of these "
                                  f"{latents.shape[0]:,} tokens; give more --tokens")
        per[name] = (latents[:, chosen].numpy().astype(np.float32), chosen, _feature_contexts(run_dir, name, chosen))
    tokens_all = np.concatenate(ids)
    vocab = np.unique(tokens_all)
    texts = dict(zip(vocab.tolist(), token_texts(tokenizer, vocab.tolist()), strict=True))
    return Corpus(tokens_all, np.concatenate([[0], np.cumsum(lengths)]), texts), per


def _feature_contexts(run_dir: Path, name: str, features: list[int]) -> dict[int, str]:
    """From `deepseemoe map`, when it ran: the experts a feature's tokens go to, the one it promotes."""
    import pandas as pd

    from deepseemoe.runs.dictionary import DictionaryRun

    run = DictionaryRun(Path(run_dir))
    summary = run.map_summary(name)
    if summary is None:
        return {}
    table = pd.DataFrame(run.map_table(name, "feature_experts"))
    layer = summary.get("layer")
    out = {}
    for i, f in enumerate(features):
        rows = table[(table.feature == f) & (table["count"] >= 3) & (table.lift > 1)].sort_values(
            "lift", ascending=False).head(3)
        if len(rows):
            where = f" of MoE layer {layer}" if layer is not None else ""
            out[i] = "Tokens where it is active are routed most often, relative to all tokens, to experts" + where + \
                ": " + ", ".join(f"{int(r.expert)} ({r.lift:.1f}× as often)" for r in rows.itertuples()) + "."
    return out


def expert_source(run_dir: Path, layer: int) -> tuple[Corpus, np.ndarray, list[int], dict[int, str]]:
    """(corpus, gate weights [N, E], the experts, MoE context per expert: domain mix) of one layer."""
    from deepseemoe.runs.routing import RoutingRun

    run = RoutingRun.open(run_dir)
    if layer not in run.layers:
        raise DeepSeeMoEError(f"layer {layer} is not an MoE layer of {run_dir}; choose from {run.layers}")
    E = run.num_experts[layer]
    ids, docs, domains, weights, texts = [], [], [], [], {}
    for part in run.parts:
        t = run.read_table("tokens", part, ["doc", "token_id", "token", "domain"]).to_pydict()
        T = len(t["doc"])
        experts, w = run.routing_layers(part, T)[layer]
        dense = np.zeros((T, E), np.float32)
        np.put_along_axis(dense, experts.astype(np.int64), w.astype(np.float32), axis=1)
        ids.append(np.asarray(t["token_id"], np.int64))
        docs.append(np.asarray(t["doc"], np.int64))
        domains += t["domain"]
        weights.append(dense)
        texts.update(zip(t["token_id"], t["token"], strict=True))
    tokens, doc, acts = np.concatenate(ids), np.concatenate(docs), np.concatenate(weights)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(doc)) + 1, [len(doc)]])
    corpus = Corpus(tokens, starts, texts)
    contexts = {}
    dom = np.array([d or "" for d in domains])
    names = sorted(set(dom) - {""})
    for e in range(E):
        routed = acts[:, e] > 0
        if names and routed.any():
            share = {d: float((routed & (dom == d)).sum() / max((dom == d).sum(), 1)) for d in names}
            contexts[e] = "Share of each domain's tokens routed to it: " + ", ".join(
                f"{d} {v:.0%}" for d, v in sorted(share.items(), key=lambda kv: -kv[1])) + "."
    return corpus, acts, list(range(E)), contexts


def _examples_from(doc: dict) -> UnitExamples:
    conv = [Example(**e) for e in doc["train"]], [Example(**e) for e in doc["test"]], \
        [Example(**e) for e in doc["not_active"]]
    return UnitExamples(doc["unit"], *conv, [tuple(t) for t in doc.get("top_tokens", [])])


def find_descriptions(run_dir: Path, words: list[str]) -> tuple[list[tuple[str, int, str]], int, int]:
    """The explained units of `run_dir` whose description holds every one of `words` (lower case):
    (module, unit, description) each, the usable descriptions searched, and the explained modules."""
    from deepseemoe.runs.explanations import stores_in

    stores = stores_in(run_dir)
    found, searched = [], 0
    for name, store in stores.items():
        for unit, text in store.explanations().items():
            if text in (NO_DESCRIPTION, UNPARSED):
                continue
            searched += 1
            if all(w in text.lower() for w in words):
                found.append((name, unit, text))
    return found, searched, len(stores)


def run_explain(store: ExplanationStore, corpus: Corpus, acts: np.ndarray, units: list[int], contexts: dict[int, str],
                backend: ChatBackend, prompts: Prompts, *, kind: str, source: dict, window: int = 24,
                seed: int = 0, routing: bool = False, sizes: dict | None = None, n_routing: int = 40,
                retries: int = 2) -> dict[int, str]:
    """Sample each unit's examples, explain it, save explanations and the examples (for `score`).
    `sizes`: Sampler.unit_examples' counts (n_top, n_quantile, n_test, n_quantiles, n_random, n_hard)."""
    sampler = Sampler(corpus, acts, window=window, seed=seed)
    per_unit = {u: sampler.unit_examples(i, **(sizes or {})) for i, u in enumerate(units)}
    context = {u: contexts[i] for i, u in enumerate(units) if i in contexts}
    explanations = explain(backend, prompts, {u: ex.train for u, ex in per_unit.items()}, context, retries=retries)
    doc = {"module": store.module, "kind": kind, "source": source, "window": window, "seed": seed,
           "backend": backend.ident, "prompts_sha256": prompts.digest(),
           "units": {str(u): {**asdict(ex), "unit": u, "context": context.get(u, "")} for u, ex in per_unit.items()}}
    if routing:  # experts: held-out tokens for routing prediction, and the token-identity baseline
        doc["routing"] = {}
        for i, u in enumerate(units):
            rex = routing_examples(sampler, i, n=n_routing)
            doc["routing"][str(u)] = {"examples": [asdict(e) for e in rex],
                                      "token_baseline": token_baseline(sampler, i, rex)}
    store.save_examples(doc)  # clears what an earlier explain wrote here
    store.save_explanations(explanations)
    return explanations


def run_score(store: ExplanationStore, backend: ChatBackend, prompts: Prompts, scorers: list[str]) -> dict:
    """Score every explained unit with each scorer and with the shuffled-explanation baseline."""
    import pyarrow as pa

    doc = store.examples()
    explanations = store.explanations()
    explained = sorted(int(u) for u in doc["units"] if int(u) in explanations)
    if not explained:
        raise DeepSeeMoEError(f"{store.path} holds no explanations to score; run `deepseemoe explain` first")
    # a unit the explainer gave no usable description is not scored: its score would be the junk's
    units = [u for u in explained if explanations[u] not in (NO_DESCRIPTION, UNPARSED)]
    examples = {u: _examples_from(doc["units"][str(u)]) for u in units}
    other = shuffled({u: explanations[u] for u in units})
    summary = {"module": store.module, "kind": doc["kind"], "backend": backend.ident,
               "explained_by": doc["backend"], "prompts_sha256": prompts.digest(), "units": len(units),
               "undescribed": len(explained) - len(units), "scorers": {}}
    rows = {"unit": explained, "explanation": [explanations[u] for u in explained]}
    if "routing" in scorers and "routing" not in doc:  # refused before the old scores are cleared
        raise DeepSeeMoEError("the routing scorer is for experts: explain the experts of a routing run")
    store.clear_scores()
    for scorer in scorers if units else []:
        if scorer == "routing":
            items = {u: routing_items([TokenExample(**e) for e in doc["routing"][str(u)]["examples"]]) for u in units}
        else:
            build = detection_items if scorer == "detection" else fuzz_items
            items = {u: build(examples[u]) for u in units}
        jobs = [(explanations[u], items[u]) for u in units]
        jobs += [(other[u], items[u]) for u in units if u in other]
        got = score_items(backend, prompts, scorer, jobs)
        own, base = got[:len(units)], got[len(units):]
        pooled_own, pooled_base = [], []
        for u, recs in zip(units, own, strict=True):
            store.save_scores(scorer, u, recs)
            pooled_own += recs
        for u, recs in zip([u for u in units if u in other], base, strict=True):
            store.save_scores(f"{scorer}_shuffled", u, recs)
            pooled_base += recs
        nan = {"balanced_accuracy": float("nan"), "f1": float("nan"), "examples": 0, "failed": 0}
        own_by_unit = dict(zip(units, [metrics(r) for r in own], strict=True))
        for col in ("balanced_accuracy", "f1", "examples", "failed"):  # undescribed units: not scored
            rows[f"{scorer}_{col}"] = [own_by_unit.get(u, nan)[col] for u in explained]
        base_by_unit = dict(zip([u for u in units if u in other], [metrics(r) for r in base], strict=True))
        rows[f"{scorer}_shuffled_balanced_accuracy"] = [base_by_unit.get(u, nan)["balanced_accuracy"]
                                                        for u in explained]
        entry = {"explanation": metrics(pooled_own), "shuffled_explanation": metrics(pooled_base) if base else None,
                 "versus_shuffled": versus_shuffled(dict(zip(units, own, strict=True)),
                                                    dict(zip([u for u in units if u in other], base, strict=True)))}
        if scorer == "routing":
            truth, pred = [], []
            for u in units:
                r = doc["routing"][str(u)]
                truth += [e["routed"] for e in r["examples"]]
                pred += r["token_baseline"]
            entry["token_baseline"] = predictions_metrics(truth, pred)
        summary["scorers"][scorer] = entry
    store.save_summary(summary, pa.table(rows))
    return summary


# no second try in the demo: on its cold run (2026-12-07) SmolLM2's retries of 20 junk answers cost
# ~40 s of the 10-minute budget and gave 5 usable descriptions
DEMO_RETRIES = 0
DEMO_SIZES = {"n_top": 6, "n_quantile": 2, "n_test": 5, "n_quantiles": 5, "n_random": 3, "n_hard": 2}


def demo_expert_explanations(routing_run: Path, layer: int, backend: ChatBackend, prompts: Prompts | None = None,
                             judge=None) -> dict:
    """The experts of one layer of a routing run, explained by `backend` and scored by routing
    prediction (by `judge`, default the backend) at the demo's sizes (RUN/explanations/layerL/);
    the scores' summary."""
    prompts = prompts or Prompts.load()
    experts = ExplanationStore.for_experts(routing_run, layer)
    corpus, acts, units, contexts = expert_source(Path(routing_run), layer)
    run_explain(experts, corpus, acts, units, contexts, backend, prompts, kind="expert",
                source={"run": str(routing_run), "layer": layer}, routing=True, sizes=DEMO_SIZES, n_routing=10,
                window=16, retries=DEMO_RETRIES)
    return run_score(experts, judge or backend, prompts, ["routing"])


def demo_explanations(routing_run: Path, layer: int, dictionaries: dict[str, tuple[Path, str]], backend: ChatBackend,
                      *, features: int = 8, tokens: int = 8_000, judge=None) -> dict[str, dict]:
    """The demo's stage: the experts of one layer of a routing run (routing prediction) and `features` features
    of each dictionary (`dictionaries`: label -> (run folder, name); detection), explained (junk is not asked
    again: DEMO_RETRIES) and scored on small example sets (10 per unit, each judged on its own prompt, beside
    another unit's description; 16-token windows) — about 40 explanations and 250 judged examples per 16 units,
    a minute for SmolLM2 on 2 cores cold; answers cached, so a rerun asks nothing. Ten examples a unit make
    coarse scores: the demo shows the pipeline, not a verdict. Returns each summary: "experts" and the labels."""
    prompts = Prompts.load()
    out = {"experts": demo_expert_explanations(routing_run, layer, backend, prompts, judge)}
    for label, (dict_run, dictionary) in dictionaries.items():
        feats = ExplanationStore.for_features(dict_run, dictionary)
        corpus, acts, units, contexts = feature_source(Path(dict_run), dictionary, data=None, tokens=tokens,
                                                       features=features)
        run_explain(feats, corpus, acts, units, contexts, backend, prompts, kind="feature",
                    source={"run": str(dict_run), "dictionary": dictionary, "tokens": tokens}, sizes=DEMO_SIZES,
                    window=16, retries=DEMO_RETRIES)
        out[label] = run_score(feats, judge or backend, prompts, ["detection"])
    return out
