"""A reduced demo end to end: the report exists, holds its figures, and its numbers agree with
the routing tables (recomputed here with DuckDB straight from the routing parquet)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import duckdb
import pytest
from markupsafe import escape

from deepseemoe.demo import run_demo


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """One cache of the tiny recipe's trained models for both reduced demos (trained once)."""
    return tmp_path_factory.mktemp("demo-cache")


def test_reduced_demo(tmp_path, cli, zoo_cache):
    import io

    from rich.console import Console

    from deepseemoe.explain.backends import OpenAIChat
    from tests.explain.stub_server import Stub

    printed = io.StringIO()
    with Stub() as stub:  # the descriptions stage through an oracle (tests/explain/test_smollm2.py runs SmolLM2)
        result = run_demo(tmp_path / "demo", recipe="tiny", cache_dir=zoo_cache, max_tokens=4000,
                          explainer=OpenAIChat(stub.url, "oracle"), console=Console(file=printed, width=400))
        # warm: nothing whose inputs did not change is computed again — no file of the study is rewritten
        written = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file()}
        asked = stub.requests
        again = run_demo(tmp_path / "demo", recipe="tiny", cache_dir=zoo_cache, max_tokens=4000,
                         explainer=OpenAIChat(stub.url, "oracle"))
        assert stub.requests == asked
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file()} == written
    assert again.report == result.report and again.summary == result.summary
    page = result.report.read_text()
    assert page.count("data:image/png;base64,") >= 4  # load, domain, co-activation, repetition
    for heading in ("Which expert is active when and where", "Expert load", "Experts × domains", "top tokens",
                    "Co-activation", "Consecutive tokens", "Router saturation", "losses per domain",
                    "Dictionaries of the MoE block", "Causal checks", "MoE vs dense",
                    "Descriptions of experts and features", "layer1.experts", "sae_block_in_1",
                    "Modules of the feature–expert graph", "An MoE carved from a dense model"):
        assert heading in page, heading
    run = tmp_path / "demo" / "run"
    summary = json.loads((run / "analyses" / "summary.json").read_text())
    # independent recomputation of each layer's max expert load from the raw routing rows
    rows = duckdb.sql(f"SELECT layer, max(c) / sum(c) FROM (SELECT layer, expert, count(*) c FROM "
                      f"read_parquet('{run}/routing/*.parquet') GROUP BY ALL) GROUP BY layer ORDER BY layer").fetchall()
    for layer, max_load in rows:
        assert summary["layers"][str(layer)]["max_load"] == pytest.approx(max_load)
        cell = re.search(rf"<td class=\"l\">{layer}</td><td>[0-9.]+</td><td>\d+</td><td>([0-9.]+)</td>", page)
        assert cell and float(cell.group(1)) == pytest.approx(max_load, abs=1e-3)
    # the graph's edge count and z as its files hold them (edges recounted from the edge table)
    for g in (tmp_path / "demo" / "dictionaries" / "graphs").glob("*/summary.json"):
        s = json.loads(g.read_text())
        edges = duckdb.sql(f"SELECT count(*) FROM read_parquet('{g.parent}/edges.parquet')").fetchall()[0][0]
        assert s["edges"] == edges
        assert f"<td>{s['nodes']}</td><td>{s['edges']}</td><td>{s['modules']}</td>" in page
    tokens = duckdb.sql(f"SELECT count(*) FROM read_parquet('{run}/tokens/*.parquet')").fetchall()[0][0]
    assert summary["tokens"] == tokens
    # the causal table shows the numbers of ablation.json
    causal = json.loads((tmp_path / "demo" / "ablate" / "ablation.json").read_text())
    for r in causal["layers"]:
        assert f"<td class=\"l\">{r['layer']}</td><td>{r['random_routing_delta_ce']:.4f}</td>" in page
    # and the removal of one domain, from the MoE and from its dense twin, shows removal.json's numbers
    removal = json.loads((tmp_path / "demo" / "remove" / "removal.json").read_text())
    assert set(removal["models"]) == {"moe", "dense"} and removal["target"]["domain"]
    assert {"expert", "expert_neuron", "feature"} <= set(removal["models"]["moe"]["kinds"])
    assert "mlp_neuron" in removal["models"]["dense"]["kinds"]
    assert f"<h2 id=\"removal\">Removing a behaviour: {removal['target']['label']}</h2>" in page
    for label, m in removal["models"].items():
        for kind, k in m["kinds"].items():
            assert (f"<td class=\"l\">{label}</td><td class=\"l\">{kind.replace('_', ' ')}</td><td>{k['units']} of "
                    f"{k['of']}</td>") in page
            assert f"<td>{k['selected']['target']:.4f}</td><td>{k['selected']['off_target']:.4f}</td>" in page
    # the carved MoE (the tiny recipe carves its own dense twin) and its random-split null, each routed; the
    # specialists table's NMI recomputed here from the raw routing rows (top-1 = rank 0) and the token domains
    carved = tmp_path / "demo" / "carved"
    spec = json.loads((carved / "specialists.json").read_text())
    assert set(spec["models"]) == {"trained", "carved", "carved, random split"}
    for label, folder in (("trained", run), ("carved", carved / "clustered"), ("carved, random split", carved / "random")):
        joint = duckdb.sql(f"SELECT r.layer, t.domain, r.expert, count(*) FROM read_parquet('{folder}/routing/*.parquet') r "
                           f"JOIN read_parquet('{folder}/tokens/*.parquet') t USING (doc, pos) WHERE r.rank = 0 "
                           "GROUP BY ALL").fetchall()
        for layer in {row[0] for row in joint}:
            cells = [(d, e, n) for la, d, e, n in joint if la == layer]
            doms, exps = sorted({d for d, _, _ in cells}), sorted({e for _, e, _ in cells})
            p = [[0.0] * len(exps) for _ in doms]
            for d, e, n in cells:
                p[doms.index(d)][exps.index(e)] = n
            total = sum(map(sum, p))
            pd_ = [sum(r) / total for r in p]
            pe = [sum(r[j] for r in p) / total for j in range(len(exps))]
            mi = sum(p[i][j] / total * math.log(p[i][j] / total / (pd_[i] * pe[j]))
                     for i in range(len(doms)) for j in range(len(exps)) if p[i][j])
            h = -sum(x * math.log(x) for x in pd_ if x) - sum(x * math.log(x) for x in pe if x)
            assert spec["models"][label]["layers"][str(layer)]["nmi"] == pytest.approx(2 * mi / h, abs=1e-9)
        mean = spec["models"][label]["mean"]
        assert f"<td class=\"l\">{label}</td>" in page and f"<td>{mean['nmi']:.3f}</td><td>{mean['nmi_null_mean']:.3f}</td>" in page
    carve = json.loads((carved / "carve.json").read_text())["carves"]
    assert set(carve) == {"clustered", "random"}
    for split, c in carve.items():  # the held-out CE differences shown are carve.json's
        assert f"<th>{split} k=4</th>" in page
        assert f"<td>{c['ce']['carved']['4']['all'] - c['ce']['dense']['all']:+.3f}</td>" in page
    # the console's line says the same: the overall held-out CE (all tokens) at the carve's top-k, 4 of 7
    ce = carve["clustered"]["ce"]
    assert f"held-out CE +{ce['carved']['4']['all'] - ce['dense']['all']:.3f} nats over the dense twin" \
        in printed.getvalue()
    # the carved MoE's block-input SAE (its middle carved layer): trained, evaluated and mapped to the carved
    # experts; the report labels it by folder beside the trained MoE's SAE of the same name, with its FVU
    cdict = carved / "dictionaries"
    ev = json.loads((cdict / "evaluation.json").read_text())["coders"]["sae_block_in_1"]
    assert f'<td class="l">carved/dictionaries: sae_block_in_1</td><td>{ev["fvu"]:.3f}</td>' in page
    assert '<td class="l">dictionaries: sae_block_in_1</td>' in page
    assert f"its block-input SAE sae_block_in_1 (float32): held-out FVU {ev['fvu']:.3f}" in printed.getvalue()
    # its features are described too, and each carved expert's row lists the described carved features with
    # the highest lift into it, recomputed here from the carved map's table (not the trained MoE's)
    from deepseemoe.runs.explanations import ExplanationStore

    carved_features = ExplanationStore.for_features(cdict, "sae_block_in_1").explanations()
    carved_experts = ExplanationStore.for_experts(carved / "clustered", 1).explanations()
    assert carved_features and carved_experts
    table = duckdb.sql(f"SELECT expert, feature, lift FROM read_parquet('{cdict}/maps/sae_block_in_1/feature_experts"
                       f".parquet') WHERE \"count\" >= 3 AND lift > 1 AND feature IN "
                       f"({','.join(map(str, carved_features))}) ORDER BY expert, lift DESC, feature").fetchall()
    section = page[page.index("<h3>layer1.experts — <code>carved/clustered</code></h3>"):]
    section = section[section.index("Each expert beside"):]
    section = section[:section.index("</table>")]
    for e in carved_experts:
        top = [(f, lift) for ex, f, lift in table if ex == e][:5]
        row = section[section.index(f"<tr><td>{e}</td>"):]
        row = row[:row.index("</tr>")]
        shown = re.findall(r"(\d+) \(([0-9.]+)×\)", row)
        assert shown == [(str(f), f"{lift:.1f}") for f, lift in top], (e, shown, top, row)
    # attribution graphs: one held-out prompt per domain of the corpus, each graph's file checksummed, its
    # sentence and sizes shown; every routing decision the sentence names is a kept node of the file
    attribution = json.loads((tmp_path / "demo" / "attribution" / "attribution.json").read_text())
    domains = {json.loads(line)["domain"] for line in (tmp_path / "demo" / "corpus" / "val.jsonl").open()}
    assert {g["label"] for g in attribution["graphs"]} == domains
    assert '<h2 id="attribution">Attribution graphs through the router</h2>' in page
    assert page.count('<svg class="attribution-graph"') == len(domains)
    for g in attribution["graphs"]:
        doc = json.loads((tmp_path / "demo" / "attribution" / g["file"]).read_text())
        assert hashlib.sha256((tmp_path / "demo" / "attribution" / g["file"]).read_bytes()).hexdigest() == g["sha256"]
        assert str(escape(g["sentence"])) in page  # as jinja escapes it
        assert f"<td>{g['summary']['kept_nodes']}</td><td>{g['summary']['kept_edges']}</td>" in page
        if g["route"] is not None:
            r = g["route"]
            node = next(n for n in doc["nodes"] if n["node_id"] == f"R{r['layer']}_{r['expert']}_{r['pos']}")
            assert node["margin"] == pytest.approx(r["margin"]) and node["weight"] == pytest.approx(r["weight"])
        assert sum(n["feature_type"] == "embedding" for n in doc["nodes"]) == g["tokens"]  # tokens always kept
    # post-training (stage 9): every strategy and the dense twin × 3 seeds on the domain of the MoE's highest
    # held-out loss; each row of the report is the mean of its points' result.json, recomputed here
    posttrain = tmp_path / "demo" / "posttrain"
    zoo = json.loads((tmp_path / "demo" / "run" / "run.json").read_text())["zoo"]
    zoo_loss = json.loads((Path(zoo) / "report.json").read_text())["val_loss"]["moe"]
    settings = json.loads((posttrain / "posttrain.json").read_text())
    assert settings["base"]["target_domain"] == max(zoo_loss, key=zoo_loss.get)
    assert '<h2 id="posttrain">Post-training the MoE, with features as hints</h2>' in page
    points = [json.loads(p.read_text()) for p in sorted((posttrain / "points").glob("*/result.json"))]
    assert len(points) == 21 and {p["strategy"] for p in points} == {
        "all", "frozen-router", "router-only", "experts-by-hint", "router-by-hint", "random-experts", "dense-all"}
    for strategy in {p["strategy"] for p in points}:
        mine = [p["target_delta_ce"] for p in points if p["strategy"] == strategy]
        mean, sd = sum(mine) / 3, (sum((x - sum(mine) / 3) ** 2 for x in mine) / 2) ** 0.5
        mean = 0.0 if round(mean, 4) == 0 else mean  # the page prints no negative zero
        assert f"<td>{mean:+.4f} ± {sd:.4f}</td>" in page, strategy
    for sentence in json.loads((posttrain / "table.json").read_text())["findings"]:  # `code` spans as <code>
        assert re.sub(r"`([^`]*)`", r"<code>\1</code>", str(escape(sentence))) in page
    assert page.count("data:image/png;base64,") >= 6  # and the two post-training figures
    # the reach sweep (stage 10): each reach's FVU cell is the mean ± sd of the seeds' own evaluation.json,
    # recomputed here; the ranked layers and the findings are shown
    import statistics

    sweep = tmp_path / "demo" / "sweep"
    assert '<h2 id="sweep">Which layers, how many neighbours</h2>' in page
    table = json.loads((sweep / "table.json").read_text())
    for row in table["rows"]:
        fvus = [json.loads((sweep / f"seed-{s}" / "evaluation.json").read_text())["coders"][row["name"]]["fvu"]
                for s in (0, 1)]
        assert f"<td class=\"l\">{row['reach']}</td><td>2</td>" in page
        assert f"<td>{statistics.mean(fvus):.3f} ± {statistics.stdev(fvus):.3f}</td>" in page, row["reach"]
    layers = json.loads((tmp_path / "demo" / "run" / "run.json").read_text())["num_layers"]
    # the other kinds at the same totals: the SAEs' FVU cell is the mean over seeds of their layers' mean
    evals = [json.loads((sweep / f"seed-{s}" / "evaluation.json").read_text()) for s in (0, 1)]
    sae = [statistics.mean(e["coders"][f"sae_block_out_{la}"]["fvu"] for la in range(layers)) for e in evals]
    assert "<td class=\"l\">SAE per layer, block output</td><td>2</td>" in page
    assert f"<td>{statistics.mean(sae):.3f} ± {statistics.stdev(sae):.3f}</td>" in page
    assert "<td class=\"l\">crosscoder, block outputs</td>" in page
    assert sorted(p["layer"] for p in table["which_layer"]) == list(range(layers))
    for sentence in table["findings"]:
        assert str(escape(sentence)) in page
    # `deepseemoe report` rebuilds the same page from the run directories alone
    from typer.testing import CliRunner

    from deepseemoe.cli import app

    again = tmp_path / "again.html"
    r = CliRunner().invoke(app, ["report", str(run), "--out", str(again)], catch_exceptions=False)
    assert r.exit_code == 0, r.output

    def strip(html: str) -> str:
        return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "", html)

    assert strip(again.read_text()) == strip(page)
    # a routing run alone (nothing beside it) reports its routing sections only
    alone = tmp_path / "alone" / "run"
    alone.parent.mkdir()
    import shutil

    shutil.copytree(run, alone)
    r = CliRunner().invoke(app, ["report", str(alone)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    solo = (alone.parent / "report" / "index.html").read_text()
    assert "Expert load" in solo and "Causal checks" not in solo and "MoE vs dense" not in solo
    # a damaged graph file is named, not drawn
    damaged = tmp_path / "demo" / "attribution" / attribution["graphs"][0]["file"]
    damaged.write_text(damaged.read_text().replace('"links"', '"links" ', 1))
    r = cli("report", run, "--out", tmp_path / "damaged.html")
    assert r.code == 2 and r.err.startswith("error:") and damaged.name in r.err
    assert not (tmp_path / "damaged.html").exists()


def test_reduced_demo_with_experts_trained_separately(tmp_path, zoo_cache):
    """`demo --separate`: the FlexOlmo-style model is trained (cached), compared as the third model,
    and the report's comparison becomes "trained separately vs together" with its losses per domain."""
    from deepseemoe.explain.backends import OpenAIChat
    from tests.explain.stub_server import Stub

    with Stub() as stub:
        result = run_demo(tmp_path / "demo", recipe="tiny", cache_dir=zoo_cache, max_tokens=2000,
                          explainer=OpenAIChat(stub.url, "oracle"), separate=True)
    page = result.report.read_text()
    assert "Trained separately vs together, and dense" in page and "MoE vs dense</h2>" not in page
    assert "<th>MoE (trained together)</th><th>MoE (experts trained separately)</th><th>dense</th>" in page
    comparison = json.loads((tmp_path / "demo" / "compare" / "comparison.json").read_text())
    # the per-domain losses are the zoo's own, read here from its report
    [zoo_report] = (zoo_cache / "zoo").glob("tiny-separate-*/report.json")
    losses = json.loads(zoo_report.read_text())["val_loss"]
    for d, v in losses["separate"].items():
        assert re.search(rf"validation loss, {d} \(nats/token; unigram [0-9.]+\)</td><td>{losses['moe'][d]:.3f}</td>"
                         rf"<td>{v:.3f}</td><td>{losses['dense'][d]:.3f}</td>", page), d
    assert comparison["separate"]["expert_names"][0] == "public"
    # both MoEs get a block-input SAE and its feature map at the same width and k; the dense twin none
    assert set(comparison["block_features"]["rows"]) == {"moe", "separate"}
    assert "block-input SAE (layer 1, ×8, k=16): routing recall@k from features" in page
    # the separate model's experts are described too, and each MoE's descriptions checked for their domain
    desc = comparison["descriptions"]
    from deepseemoe.runs.explanations import ExplanationStore

    def described(run: str) -> set[int]:
        folder = tmp_path / "demo" / run / "explanations" / "layer1"
        return set(ExplanationStore(folder, "layer1.experts").explanations())

    sep, joint = described("separate/run"), described("run")
    assert sep and joint
    assert desc["separate"]["experts"] == len(sep - {0})  # every described expert but the public one
    assert desc["moe"]["experts"] == len(joint) and 0 <= desc["moe"]["named"] <= len(joint)
    assert f"{desc['separate']['named']} of {desc['separate']['experts']}" in page
    assert "experts — the expert trained on it, every layer: ΔCE on the domain" in page
    # the trained MoE's experts are described here too, beside the features of its SAE that route to them
    assert "features that route to it" in page
