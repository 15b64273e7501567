"""The static report: one self-contained HTML page (figures embedded), opened from disk.

Inputs are the files of a study directory (runs/study.py) and nothing else: the routing run and
its analyses/, and whatever dictionaries, maps, ablations, comparisons, checkpoint runs and model
training report sit beside it.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

import numpy as np
from markupsafe import Markup, escape

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.report.components import Strip, expert_colors, show_token
from deepseemoe.runs.atomic import atomic_write_bytes
from deepseemoe.runs.dictionary import DictionaryRun
from deepseemoe.runs.study import Study


def routing_samples(run_dir: Path, layers: list[int], tokens_per_sample: int = 40) -> list[Strip]:
    """The first `tokens_per_sample` tokens of one document per domain with their routing."""
    from deepseemoe.runs.routing import RoutingRun

    run = RoutingRun.open(run_dir)
    tokens = run.tokens(["doc", "pos", "token", "domain"]).to_pandas()
    firsts = tokens.groupby("domain", dropna=False)["doc"].min()
    wanted = {int(d) for d in firsts}
    by: dict[tuple[int, int, int], tuple[list[int], list[float]]] = {}
    for part in run.parts:  # only shards holding a wanted document, each read (and verified) once
        t = run.read_table("tokens", part, ["doc", "pos"])
        docs = t["doc"].to_numpy()
        if not wanted & set(docs.tolist()):
            continue
        for layer, (e, w) in run.routing_layers(part, len(docs)).items():
            for i in np.nonzero(np.isin(docs, list(wanted)))[0]:
                by[(int(docs[i]), layer, int(t["pos"][i].as_py()))] = (e[i].tolist(), w[i].tolist())
    samples = []
    for domain, doc in sorted(firsts.items(), key=lambda kv: (kv[0] is None or kv[0] != kv[0], str(kv[0]))):
        rows = tokens[tokens["doc"] == doc].sort_values("pos").head(tokens_per_sample)
        if rows.empty:
            continue
        label = domain if isinstance(domain, str) else "(no domain)"
        routing = {}
        for layer in layers:
            cells = [by.get((int(doc), layer, int(pos)), ([0], [0.0])) for pos in rows["pos"]]
            routing[layer] = ([e for e, _ in cells], [w for _, w in cells])
        samples.append(Strip.from_arrays([p or "" for p in rows["token"]], routing, label))
    return samples


DEMO_NOTE = ("A small model trained in minutes on a CPU: expect weak, mostly lexical specialisation, as in the "
             "larger MoEs of the literature but fainter.")


def saturation_rows(study: Study) -> list[dict]:
    """Router saturation of each earlier checkpoint against the study's run (OLMoE §5.1), per layer."""
    import re

    from deepseemoe.routing.stats import router_saturation

    final = (study.zoo_report or {}).get("recipe", {}).get("steps")
    rows = []
    for ck in study.checkpoints:
        sat = router_saturation(ck.run_dir, study.run.run_dir)
        m = re.fullmatch(r"step-0*(\d+)", ck.run_dir.name)
        label = ck.run_dir.name
        if m and final:
            label = f"{int(m.group(1))} ({100 * int(m.group(1)) / final:.0f}%)"
        rows.append({"step": label, "values": [v["topk_saturation"] for v in sat["layers"].values()]})
    return rows


def build_report(run_dir: str | Path, out_path: str | Path | None = None, *,
                 checkpoint_runs: list[str | Path] | None = None, title: str | None = None,
                 notes: list[str] | None = None, trust: bool = False) -> Path:
    """The report of a study, from its run directories alone (runs/study.py): the routing run's
    statistics, and whatever dictionaries, maps, ablations, comparisons and checkpoints sit beside it.
    Default output: STUDY/report/index.html. Every file of the routing run is checked against its
    manifest first unless `trust`."""
    study = Study.open(run_dir, checkpoint_runs)
    if not trust:
        study.run.verify_all()
    meta = study.run.meta
    if title is None:
        recipe = meta.get("recipe")
        title = (f"offline demo: OLMoE trained on this machine (recipe '{recipe}')" if recipe
                 else str(meta.get("model", study.run.run_dir.name)))
    notes = list(notes or []) + ([DEMO_NOTE] if meta.get("recipe") else [])
    out_path = Path(out_path) if out_path else study.run.run_dir.parent / "report" / "index.html"
    return write_report(study, out_path, title=title, notes=notes)


def write_report(study: Study, out_path: str | Path, *, title: str, notes: list[str] | None = None,
                 min_count: int = 5) -> Path:
    """Render a study's routing analyses and whatever else it holds into one HTML file."""

    import jinja2

    out_path = Path(out_path)
    run_dir = study.run.run_dir
    analyses = study.run.analyses()
    zoo_report = study.zoo_report
    saturation = saturation_rows(study)
    summary = analyses.summary
    layers = [int(x) for x in summary["layers"]]
    first = summary["layers"][str(layers[0])]
    experts, top_k = first["experts"], first["top_k"]

    def fig(name: str) -> Markup:
        png = analyses.figure(name)
        if png is None:
            return Markup("")
        data = base64.b64encode(png).decode()
        return Markup(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')

    summary_rows = []
    for layer in layers:
        s = summary["layers"][str(layer)]
        nxt = s.get("transition_to_next")
        summary_rows.append({"layer": layer, "load_entropy": s["load_entropy"], "dead": s["dead_experts"],
                             "max_load": s["max_load"], "domain_nmi": s["domain_nmi"],
                             "domain_nmi_top1": s.get("domain_nmi_top1"),
                             "rep": s["repetition"]["top1_same"], "rep_base": s["repetition"]["top1_same_load_matched"],
                             "vocab": s["vocab_specialization_input"] or 0.0,
                             "next_nmi": f"{nxt['nmi']:.3f}" if nxt else "–"})
    vocab = analyses.table("vocab_top_tokens")
    top_layer = layers[len(layers) // 2]
    top_tokens = []
    for e in range(experts):
        sub = vocab[(vocab["layer"] == top_layer) & (vocab["expert"] == e)].sort_values("rank").head(8)
        top_tokens.append({"expert": e, "tokens": "  ".join(f"{show_token(t)} ({s:.2f})"
                                                            for t, s in zip(sub["token"], sub["share"], strict=True))})
    losses = []
    training = ""
    if zoo_report:
        for domain in sorted(zoo_report["val_loss"]["moe"]):
            losses.append({"domain": domain, "moe": zoo_report["val_loss"]["moe"][domain],
                           "dense": zoo_report["val_loss"]["dense"][domain],
                           "unigram": zoo_report["unigram_baseline"][domain]})
        r = zoo_report["recipe"]
        training = (f"Recipe '{r['name']}': {r['steps']} steps × {r['batch_size']}×{r['seq_len']} tokens "
                    f"({zoo_report['tokens_per_model']:,} tokens per model); hidden {r['hidden']}, {r['layers']} layers, "
                    f"{r['experts']} experts × {r['expert_hidden']}, top-{r['top_k']}; dense twin MLP "
                    f"{r['top_k'] * r['expert_hidden']}. Router aux-loss coefficient {r['aux_loss_coef']}.")
    colors, text_colors = expert_colors(experts)
    sections = [("models", "models")] if losses else []
    sections += [("summary", "summary"), ("where", "routing view"), ("load", "load"), ("domains", "domains"),
                 ("tokens", "top tokens"), ("coactivation", "co-activation"), ("repetition", "repetition")]
    if saturation:
        sections.append(("saturation", "saturation"))
    extra = _analyses_context(study)
    if extra["coders"] or extra["maps"]:
        sections.append(("dictionaries", "dictionaries"))
    if extra["graphs"]:
        sections.append(("graphs", "modules"))
    for key, anchor, label in (("causal_all", "causal", "causal checks"), ("removal_all", "removal", "removing a behaviour"),
                               ("wiring_all", "wiring", "wiring"), ("comparison_all", "compare", ""),
                               ("carved_all", "carved", "carved MoE"),
                               ("attribution_all", "attribution", "attribution graphs"),
                               ("posttrain_all", "posttrain", "post-training"),
                               ("sweep_all", "sweep", "which layers, how many neighbours")):
        for i, item in enumerate(extra[key]):  # every result folder of the study, each its own section
            if key == "comparison_all":
                label = "trained separately vs together" if "separate" in item.sides else "MoE vs dense"
            folder = item["folder"] if isinstance(item, dict) else item.folder
            more = len(extra[key]) > 1
            sections.append((anchor if i == 0 else f"{anchor}-{i + 1}", f"{label} ({folder})" if more else label))
    if extra["explanations"]:
        sections.append(("descriptions", "descriptions"))
    env = jinja2.Environment(loader=jinja2.PackageLoader("deepseemoe.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    page = env.get_template("report.html.j2").render(
        title=title, tokens=f"{summary['tokens']:,}", layers=layers, experts=experts, top_k=top_k,
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), sections=sections,
        notes=(notes or []) + summary.get("notes", []), losses=losses, training=training,
        summary_rows=summary_rows, vocab_uniform=top_k / experts, samples=routing_samples(run_dir, layers),
        colors=colors, text_colors=text_colors, fig=fig, top_tokens=top_tokens, top_layer=top_layer,
        min_count=min_count, saturation=saturation, extra=extra)
    atomic_write_bytes(out_path, page.encode())
    return out_path


def _png(path: Path | None) -> Markup:
    if path is None or not Path(path).exists():
        return Markup("")
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return Markup(f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">')


def _analyses_context(study: Study) -> dict:
    """Tables of the dictionaries / causal / comparison parts of a study, each None when absent."""
    from deepseemoe.report.tables import comparison_table, removal_table

    coders, maps, graphs = [], [], []
    every = [*study.dictionary_runs, *study.other_dictionary_runs]  # another model's (a carved MoE's) too
    for d in every:
        # with several dictionary runs (the demo's: the trained MoE's and the carved MoE's), each name
        # says whose it is
        where = f"{d.path.relative_to(study.run.run_dir.parent)}: " if len(every) > 1 else ""
        for name, r in d.evaluation["coders"].items():
            coders.append({"name": where + name, "kind": r["kind"], "fvu": r["fvu"], "l0": r["l0"], "dead": r["dead"],
                           "delta_ce": r.get("delta_ce"), "kl": r.get("kl"), "recovered": r.get("loss_recovered"),
                           "routing": r.get("routing_preserved"), "probing": r.get("sparse_probing"),
                           "absorption": r.get("absorption"), "alignment": r.get("expert_alignment")})
        for name, m in d.maps.items():
            rp = m["routing_prediction"]
            maps.append({"name": where + name, "layer": m["layer"], "live": m["live_features"], "features": m["features"],
                         "specificity": m["specificity_median"], "specific_share": m["expert_specific_share"],
                         "rp": rp, "attr": m.get("attribution")})
        for name, g in d.graphs.items():
            graphs.append({"name": where + name, "summary": g, "figure": _png(d.graph_figure(name)),
                           "kinds": ", ".join(f"{k['kind']} {k['kept']:,} of {k['candidates']:,} "
                                              f"({100 * k['mass_share']:.0f}% of the weight)" for k in g["edge_kinds"])})
    results = study.results
    return {"coders": coders or None, "maps": maps or None, "graphs": graphs or None,
            "causal_all": [_causal(r, _where(study, r)) for r in results.get("ablation", [])],
            "removal_all": [{"folder": _where(study, r), "table": removal_table(r.doc),
                             "figure": _png(r.figures[0]) if r.figures else None} for r in results.get("removal", [])],
            "wiring_all": [{**r.doc, "folder": _where(study, r)} for r in results.get("wiring", [])],
            "comparison_all": [comparison_table(r.doc, folder=_where(study, r)) for r in results.get("comparison", [])],
            "carved_all": [_carved(r, study, _where(study, r)) for r in results.get("carve", [])],
            "attribution_all": [_attribution(r, _where(study, r)) for r in results.get("attribution", [])],
            "posttrain_all": [_posttrain(r, _where(study, r)) for r in results.get("posttrain", [])],
            "sweep_all": [_sweep(r, _where(study, r)) for r in results.get("sweep", [])],
            "explanations": _explanations_context(study) or None}


def _carved(result, study: Study, folder: str) -> dict:
    """The section of a folder of carved MoEs (carve.json, and specialists.json beside it): held-out
    CE of each carve against the dense model at every measured k, router recall, and the
    specialisation of every routing run compared there against its domain-permutation null."""
    from deepseemoe.zoo.carve import router_mean

    carves = result.doc["carves"]
    first = next(iter(carves.values()))
    ks = list(first["ce"]["carved"])
    domains = list(first["ce"]["dense"])
    ce = [{"domain": d, "dense": first["ce"]["dense"][d],
           "delta": [c["ce"]["carved"][k][d] - c["ce"]["dense"][d] for c in carves.values() for k in ks]}
          for d in domains]
    recall = [router_mean(c, "recall")[k] for c in carves.values() for k in ks]
    spec = next((r.doc for r in study.results.get("specialists", []) if r.folder == result.folder), None)
    profiles = []
    if spec:
        for label, m in spec["models"].items():
            layers = list(m["layers"])
            layer = m["layers"][layers[len(layers) // 2]]
            profiles.append({"label": label, "layer": layer["layer"],
                             "experts": [{**p, "tokens": "  ".join(show_token(t) for t, _ in p["top_tokens"])}
                                         for p in sorted(layer["profiles"], key=lambda p: -p["lift"])]})
    return {"folder": folder, "splits": list(carves), "ks": ks, "ce": ce, "recall": recall, "first": first,
            "specialists": spec, "profiles": profiles}


def _attribution(result, folder: str) -> dict:
    """The section of a folder of attribution graphs: per prompt, its sentences, sizes and drawing."""
    from deepseemoe.report.graph_svg import LEGEND, graph_svg
    from deepseemoe.runs.study import read_attribution_graph

    graphs = [{**entry, "svg": graph_svg(read_attribution_graph(result.folder, entry))}
              for entry in result.doc["graphs"]]
    return {"folder": folder, "graphs": graphs, "legend": LEGEND, "meta": result.doc}


def _posttrain(result, folder: str) -> dict:
    """The section of a post-training study: its settings, the hint, one row per strategy (mean ± sd
    over the seeds), the findings written from those numbers, and its figures."""
    doc = result.doc
    st, base = doc["settings"]["settings"], doc["settings"]["base"]
    labels = {"dense-all": f"dense twin, all (rank {base.get('dense_rank', st['rank'])})"}

    from deepseemoe.measures import plus_minus

    def cell(row, key, digits, signed=False):
        return plus_minus(row.get(key, float("nan")), row.get(f"{key}_sd"), digits, signed)

    rows = [{"label": labels.get(r["strategy"], r["strategy"]), "seeds": r["seeds"],
             "cells": [cell(r, "target_delta_ce", 4, True), cell(r, "forgetting", 4, True),
                       cell(r, "drift", 3), cell(r, "changed", 3), cell(r, "hint_routed_after", 2),
                       cell(r, "other_drift", 3), cell(r, "nmi_after", 3)],
             "trainable": f"{r['trainable']:,.0f}", "seconds": f"{r['seconds']:.1f}"} for r in doc["rows"]]
    return {"folder": folder, "settings": st, "base": base, "hint": doc["settings"].get("hint"), "rows": rows,
            "findings": _code_spans(" ".join(doc.get("findings", []))), "figures": [_png(p) for p in result.figures]}


def _sweep(result, folder: str) -> dict:
    """The section of a reach sweep: its settings, one row per reach (mean ± sd over the seeds), the
    ranked layers, the findings written from those numbers, and its figures."""
    from deepseemoe.compare.sweep import COLUMNS, OTHER_COLUMNS, OTHER_LABELS, shown_columns
    from deepseemoe.measures import plus_minus

    doc = result.doc
    columns = shown_columns(COLUMNS, doc["rows"])  # and the autointerp scores when the sweep has them
    rows = [{"reach": r["reach"], "seeds": r["seeds"], "l0": f"{r['l0']:.1f}",
             "cells": [plus_minus(r.get(key), r.get(f"{key}_sd"), 3) for key, _ in columns]} for r in doc["rows"]]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    layers = [{"layer": p["layer"], "ablation": f(p.get("ablation_delta_ce"), "+.4f"),
               "nmi": f(p.get("domain_nmi"), ".3f"), "nmi_shuffled": f(p.get("domain_nmi_shuffled"), ".3f"),
               "fvu": f(p.get("fvu"), ".3f"),
               "ranks": ", ".join(str(p.get(f"{k}_rank", "–")) for k in ("ablation_delta_ce", "domain_nmi", "fvu")),
               "mean_rank": f(p.get("mean_rank"), ".2f")} for p in doc.get("which_layer", [])]
    other_columns = shown_columns(OTHER_COLUMNS, doc.get("other_kinds", []))
    others = [{"kind": OTHER_LABELS[o["kind"]],
               "seeds": o["seeds"], "l0": f"{o['l0']:.1f}",
               "cells": [plus_minus(o.get(key), o.get(f"{key}_sd"), 3) for key, _ in other_columns]}
              for o in doc.get("other_kinds", [])]
    return {"folder": folder, "settings": doc["settings"]["settings"], "columns": [label for _, label in columns],
            "rows": rows, "elbow": doc.get("elbow"), "layers": layers, "others": others,
            "other_columns": [label for _, label in other_columns],
            "findings": " ".join(doc.get("findings", [])), "figures": [_png(p) for p in result.figures]}


def _code_spans(text: str) -> Markup:
    """Markdown's `code` spans (the findings are written for table.md too) as <code>, the rest escaped."""
    parts = text.split("`")
    return Markup("".join(f"<code>{escape(p)}</code>" if i % 2 else str(escape(p)) for i, p in enumerate(parts)))


def _where(study: Study, result) -> str:
    """A result folder as the reader finds it: relative to the study folder."""
    return str(result.folder.relative_to(study.run.run_dir.parent))


def _causal(result, folder: str) -> dict:
    """The causal-checks section of one ablation folder."""
    from deepseemoe.report.tables import causal_rows

    c = result.doc
    return {"folder": folder, "layers": causal_rows(c), "sweep": c["disable_top_r"], "tokens": c["tokens"],
            "figures": [_png(p) for p in result.figures]}


def _explanations_context(study: Study) -> list[dict]:
    """Per explained module: pooled scores beside their baselines and the judge's answers, and each
    unit's description beside what its examples show (`evidence`) and, for experts, its domains."""
    from deepseemoe.explain.explainer import NO_DESCRIPTION, UNPARSED, evidence
    from deepseemoe.explain.scorers import versus_shuffled

    out = []
    for store in [*study.explanations, *study.other_explanations]:
        summary = store.summary()
        table = store.units_table()
        texts = store.explanations()
        if not texts:
            continue
        scorers = []
        for name, entry in (summary or {}).get("scorers", {}).items():
            own, base = entry["explanation"], entry.get("shuffled_explanation")
            scorers.append({"name": name, "own": own["balanced_accuracy"], "f1": own["f1"],
                            "shuffled": base["balanced_accuracy"] if base else None,
                            "auroc": own.get("auroc"), "shuffled_auroc": base.get("auroc") if base else None,
                            "token": entry.get("token_baseline", {}).get("balanced_accuracy"),
                            "examples": own["examples"], "failed": own["failed"], "judge": own.get("judge"),
                            "versus": entry.get("versus_shuffled")
                            or versus_shuffled(store.scores(name), store.scores(f"{name}_shuffled"))})
        rows = table.to_pylist() if table is not None else [{"unit": u, "explanation": t} for u, t in sorted(texts.items())]
        cols = [s["name"] for s in scorers]
        doc = store.examples()
        run = _store_run(study, store)
        domains = _expert_domains(run, store.module) if run is not None else {}
        elsewhere = store in study.other_explanations  # another model's experts (a carved MoE's)
        units = [{"unit": r["unit"], "text": r["explanation"], "described": r["explanation"] not in (NO_DESCRIPTION, UNPARSED),
                  "evidence": _shown(evidence(doc["units"].get(str(r["unit"]), {}))), "domains": domains.get(r["unit"], []),
                  "scores": [r.get(f"{c}_balanced_accuracy") for c in cols]} for r in rows]
        backend = (summary or {}).get("backend", "")
        explained_by = (summary or {}).get("explained_by") or store.examples().get("backend", "")
        out.append({"module": store.module, "backend": backend, "explained_by": explained_by,
                    "weak": "SmolLM2" in f"{backend} {explained_by}", "scorers": scorers,
                    "folder": str(store.path.parent.parent.relative_to(study.run.run_dir.parent))
                    if elsewhere or (run is None and len(study.dictionary_runs) + len(study.other_dictionary_runs) > 1)
                    else None,
                    "columns": cols, "units": units,
                    "mapped": _mapped(store, _same_model(run, study.other_dictionary_runs), study.other_explanations)
                    if elsewhere else _mapped(store, study.dictionary_runs, study.explanations),
                    "undescribed": sum(not u["described"] for u in units)})
    return out


def _shown(ev: dict) -> dict:
    return {**ev, "tokens": [(show_token(t), n) for t, n in ev["tokens"]]}


def _store_run(study: Study, store):
    """The routing run whose experts an experts' store describes: the study's own, or for another
    model's (`Study.other_explanations`, RUN/explanations/layerL/) that run; None for a dictionary's
    store."""
    from deepseemoe.runs.routing import RoutingRun

    if not store.module.endswith(".experts"):
        return None
    if store not in study.other_explanations:
        return study.run
    try:
        return RoutingRun.open(store.path.parent.parent)
    except DeepSeeMoEError:
        return None


def _expert_domains(run, module: str, n: int = 2) -> dict[int, list[tuple[str, float]]]:
    """For a store of layer L's experts of routing run `run`: each expert's domains with the largest
    lift over uniform (the run's domain table), else nothing."""
    if not module.endswith(".experts"):
        return {}
    layer = int(module.split(".")[0].removeprefix("layer"))
    try:
        table = run.analyses().table("domain")
    except DeepSeeMoEError:  # a run beside the study without statistics
        return {}
    if table.empty:  # a corpus without domains
        return {}
    sub = table[table["layer"] == layer].sort_values("lift_over_uniform", ascending=False)
    return {int(e): [(str(d), float(x)) for d, x in zip(rows["domain"][:n], rows["lift_over_uniform"][:n], strict=True)]
            for e, rows in sub.groupby("expert")}


def _same_model(run, dictionary_runs: list) -> list:
    """The dictionary runs trained on the model of routing run `run` (another model's, e.g. a carved
    MoE's beside its routing run in STUDY/carved/)."""
    from deepseemoe.dictionaries.config import RunSpec

    if run is None:
        return []
    model = str(run.meta.get("model", ""))
    return [d for d in dictionary_runs if RunSpec.from_run_dir(d.path).model == model]


def _mapped(experts, runs: list, stores: list) -> list | None:
    """For an experts' store of layer L: each expert's description beside those of the features
    whose tokens go to it most, from a dictionary of the same model (`runs`, described in `stores`)
    mapped to layer L whose features were explained."""
    from deepseemoe.explain.mapping import map_descriptions

    if not experts.module.endswith(".experts"):
        return None
    layer = int(experts.module.split(".")[0].removeprefix("layer"))
    for d in runs:
        for name, m in d.maps.items():
            store = next((s for s in stores if s.module == name and s.path.is_relative_to(d.path)), None)
            if m.get("layer") == layer and store is not None:
                table = DictionaryRun(d.path).map_table(name, "feature_experts")
                return [{"dictionary": name, **vars(row)} for row in map_descriptions(experts, store, table)]
    return None
