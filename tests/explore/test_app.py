"""The explorer's pages through the framework's test client, each number against an independent
reference: the routing parquet read with DuckDB, `deepseemoe route` and `deepseemoe ablate` run on
the same text, the map tables, a hand check of the limits."""

from __future__ import annotations

import html
import json
import re
import shutil

import duckdb
import pytest

from tests.explore.conftest import TEXT, busiest_expert, strip_cells


@pytest.fixture(scope="module")
def client(study):
    from fastapi.testclient import TestClient

    from deepseemoe.explore.app import Explorer, RateLimit, create_app

    explorer = Explorer.open([study], rate=RateLimit(rate=1000, burst=1000))
    return TestClient(create_app(explorer))


def _run_meta(study):
    return json.loads((study / "run" / "run.json").read_text())


def test_overview_shows_the_layout_and_the_load_of_the_routing_rows(study, client):
    r = client.get("/", follow_redirects=True)
    assert r.status_code == 200 and "MoE layout" in r.text
    meta = _run_meta(study)
    for layer, m in meta["moe_layers"].items():
        assert re.search(rf'<a href="/s/demo\?layer={layer}">{layer}</a></td><td>{m["num_experts"]}</td>'
                         rf'<td>{m["top_k"]}</td>', r.text)
    # load heatmap cells: the share of slots, recomputed from the long routing parquet
    rows = duckdb.sql(f"SELECT layer, expert, count(*) / sum(count(*)) OVER (PARTITION BY layer) FROM "
                      f"read_parquet('{study}/run/routing/*.parquet') GROUP BY layer, expert").fetchall()
    # the graphs `graph` wrote beside the dictionaries, with their layouts
    assert list(study.glob("*/graphs/*/summary.json")), "the demo writes graphs"
    for g in study.glob("*/graphs/*/summary.json"):
        s = json.loads(g.read_text())
        assert f"<td>{s['nodes']}</td><td>{s['edges']}</td><td>{s['modules']}</td>" in r.text
        key = g.parent.name  # one dictionary run in the study: the name `map` and `graph` take
        png = client.get(f"/s/demo/graph/{key}.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get("/s/demo/graph/nope.png").status_code == 404
    assert client.get("/s/demo/graph/nope").status_code == 404
    assert client.get("/api/s/demo/graph/nope").json()["error"]
    load = r.text[r.text.index('id="load"'):]
    load = load[:load.index("</table>")]
    for layer, expert, share in rows:
        assert f'href="/s/demo/expert/{layer}/{expert}">{share:.3f}</a>' in load


def test_a_recorded_document_shows_the_routing_route_stored(study, client):
    doc = duckdb.sql(f"SELECT min(doc) FROM read_parquet('{study}/run/tokens/*.parquet')").fetchall()[0][0]
    r = client.get(f"/s/demo/doc/{doc}")
    assert r.status_code == 200
    shown = strip_cells(r.text, "strip")
    rows = duckdb.sql(f"SELECT layer, pos, list(expert ORDER BY rank) FROM read_parquet('{study}/run/routing/*.parquet') "
                      f"WHERE doc = {doc} GROUP BY layer, pos ORDER BY layer, pos").fetchall()
    expected: dict[int, list[list[int]]] = {}
    for layer, _pos, experts in rows:
        expected.setdefault(layer, []).append(list(experts))
    assert shown == {la: v[:256] for la, v in expected.items()}
    # the next page starts where asked and shows the rows from there (a 4-layer model: 256 tokens a page)
    later = strip_cells(client.get(f"/s/demo/doc/{doc}", params={"start": 3}).text, "strip")
    assert later == {la: v[3:3 + 256] for la, v in expected.items()}


def test_typed_text_routes_as_route_records_it(study, client, cli, tmp_path):
    """The text view and its JSON twin show exactly the experts `deepseemoe route` records."""
    meta = _run_meta(study)
    (tmp_path / "text.txt").write_text(TEXT)
    res = cli("route", meta["model"], "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "r"),
              "--ctx-len", str(meta["ctx_len"]))
    assert res.code == 0, res.err
    rows = duckdb.sql(f"SELECT layer, pos, list(expert ORDER BY rank) FROM read_parquet('{tmp_path}/r/routing/*.parquet') "
                      "GROUP BY layer, pos ORDER BY layer, pos").fetchall()
    recorded: dict[int, list[list[int]]] = {}
    for layer, _pos, experts in rows:
        recorded.setdefault(layer, []).append(list(experts))
    api = client.get("/api/s/demo/route", params={"text": TEXT}).json()
    assert {int(k): v for k, v in api["experts"].items()} == recorded
    page = client.get("/s/demo/text", params={"text": TEXT})
    assert page.status_code == 200 and "tokens/s" in page.text
    assert strip_cells(page.text, "strip") == recorded


def test_playground_ablation_gives_ablates_number(study, client, cli, tmp_path):
    meta = _run_meta(study)
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": TEXT, "domain": "typed"}) + "\n")
    layer = int(next(iter(meta["moe_layers"])))
    expert = busiest_expert(study, layer)  # its ablation moves the loss
    res = cli("ablate", meta["model"], "--data", str(tmp_path / "text.jsonl"), "--out", str(tmp_path / "a"),
              "--ctx-len", str(meta["ctx_len"]), "--layers", str(layer), "--experts", str(expert))
    assert res.code == 0, res.err
    row = next(r for r in json.loads((tmp_path / "a" / "ablation.json").read_text())["experts"]
               if r["layer"] == layer and r["expert"] == expert)
    api = client.get("/api/s/demo/playground", params={"text": TEXT, "op": "ablate", "layer": layer,
                                                       "experts": str(expert)}).json()
    assert abs(row["ablate_delta_ce"]) > 1e-5  # a number worth comparing (the tiny model's experts matter little)
    assert api["delta_ce"] == pytest.approx(row["ablate_delta_ce"], rel=1e-4, abs=1e-8)
    excl = client.get("/api/s/demo/playground", params={"text": TEXT, "op": "exclude", "layer": layer,
                                                        "experts": str(expert)}).json()
    assert excl["delta_ce"] == pytest.approx(row["exclude_delta_ce"], rel=1e-4, abs=1e-8)
    # excluding an expert: it appears nowhere in that layer's changed strip, and the cells that lost it are flagged
    page = client.get("/s/demo/playground", params={"text": TEXT, "op": "exclude", "layer": layer,
                                                    "experts": str(expert)})
    clean, edited = strip_cells(page.text, "clean"), strip_cells(page.text, "edited")
    assert all(expert not in cell for cell in edited[layer])
    flagged = re.findall(rf'class="cell e\d+ changed" data-layer="{layer}" data-token="(\d+)"', page.text)
    assert {int(t) for t in flagged} == {t for t, cell in enumerate(clean[layer]) if expert in cell}
    # forcing experts: every token of that layer shows exactly them
    forced = client.get("/s/demo/playground", params={"text": TEXT, "op": "force", "layer": layer, "experts": "2,3"})
    assert all(sorted(c) == [2, 3] for c in strip_cells(forced.text, "edited")[layer])


def test_expert_page_contexts_are_the_largest_gate_weights(study, client):
    layer, expert = 1, 0
    r = client.get(f"/s/demo/expert/{layer}/{expert}")
    assert r.status_code == 200 and "Top contexts" in r.text
    weights = [w for (w,) in duckdb.sql(
        f"SELECT weight FROM read_parquet('{study}/run/routing/part-00000.parquet') WHERE layer = {layer} "
        f"AND expert = {expert} ORDER BY weight DESC LIMIT 12").fetchall()]
    table = r.text[r.text.index('id="contexts"'):]
    shown = [float(x) for x in re.findall(r"<tr><td>([0-9.]+)</td><td>\d</td>", table[:table.index("</table>")])]
    assert shown == pytest.approx([round(w, 3) for w in weights], abs=6e-4)
    # the ablation section shows `ablate`'s row for this expert
    ablation = json.loads((study / "ablate" / "ablation.json").read_text())
    row = next(x for x in ablation["experts"] if x["layer"] == layer and x["expert"] == expert)
    assert f"<strong>{row['ablate_delta_ce']:.4f}</strong>" in r.text


def test_feature_page_shows_the_maps_numbers_and_its_description(study, client):
    r = client.get("/s/demo")
    links = re.findall(r'href="/s/demo/feature/([^/"]+)/(\d+)"', r.text)
    assert links, "the overview links the described features"
    key, feature = links[0][0], int(links[0][1])
    name = key  # one dictionary run in the study: the explorer names a dictionary as `map` and `explain` take it
    assert next(study.glob(f"*/maps/{name}"), None) is not None, key
    page = client.get(f"/s/demo/feature/{key}/{feature}")
    assert page.status_code == 200
    maps = next(study.glob(f"*/maps/{name}"))
    rows = duckdb.sql(f"SELECT expert, p_e_given_f FROM read_parquet('{maps}/feature_experts.parquet') "
                      f"WHERE feature = {feature} ORDER BY p_e_given_f DESC LIMIT 3").fetchall()
    for e, p in rows:
        assert f">E{e}</a></td>" in page.text and f"P(e|f) {p:.2f}" in page.text
    text = json.loads(next(maps.parent.parent.glob(f"explanations/{name}/explanations/{name}_latent{feature}.txt")).read_text())
    assert html.escape(text) in page.text
    examples = json.loads((maps / "examples.json").read_text()).get(str(feature), {})
    for ex in examples.get("top", [])[:3]:
        assert f"{ex['activation']:.3f}" in page.text
    # the description is found by a word of it
    word = max(text.split(), key=len).strip(".,;:'\"()")
    assert f"/s/demo/feature/{key}/{feature}" in client.get("/s/demo/search", params={"q": word}).text


def test_compare_page_links_its_units(study, client):
    r = client.get("/s/demo/compare")
    assert r.status_code == 200 and 'id="comparison"' in r.text
    assert re.search(r'href="/s/demo/expert/\d+/\d+">layer \d+ E\d+</a>', r.text)
    # the removal of a domain (`ablate --target`): its table, and the removed experts linked
    removal = json.loads((study / "remove" / "removal.json").read_text())
    assert 'id="removal"' in r.text and f"Removing a behaviour: {removal['target']['label']}" in r.text
    for c in removal["models"]["moe"]["kinds"]["expert"]["chosen"]:
        assert f'<a href="/s/demo/expert/{c["layer"]}/{c["unit"]}">layer {c["layer"]} E{c["unit"]}</a>' in r.text


def test_safe_by_default(study, client, tmp_path):
    from fastapi.testclient import TestClient

    from deepseemoe.commands.serve import is_loopback
    from deepseemoe.explore.app import Explorer, RateLimit, create_app
    from deepseemoe.explore.live import Limits

    assert client.get("/s/nope").status_code == 404
    assert client.get("/s/demo/figure/..%2F..%2Frun.json.png").status_code == 404
    assert client.get("/s/demo/figure/summary.png").status_code == 404  # a file of the run, but no figure
    bad = client.get("/s/demo/expert/1/999")
    assert bad.status_code == 400 and "error: expert 999 does not exist" in bad.text
    assert client.get("/api/s/demo/playground", params={"text": TEXT, "op": "rm", "layer": 1, "experts": "1"}).status_code == 400
    # bounded text, and a rate limit per client
    small = TestClient(create_app(Explorer.open([study], limits=Limits(max_chars=10), rate=RateLimit(rate=0.01, burst=2))))
    long = small.get("/api/s/demo/route", params={"text": "x" * 11})
    assert long.status_code == 400 and "at most 10" in long.json()["error"]
    codes = [small.get("/api/s/demo/route", params={"text": "ab"}).status_code for _ in range(3)]
    assert codes[-1] == 429
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    # a damaged shard is refused in one line, naming it
    copy = tmp_path / "copy"
    shutil.copytree(study / "run", copy / "run")
    matrix = next((copy / "run" / "matrix").glob("*.safetensors"))
    data = bytearray(matrix.read_bytes())
    data[-1] ^= 0xFF
    matrix.write_bytes(bytes(data))
    damaged = TestClient(create_app(Explorer.open([copy / "run"])))
    r = damaged.get("/s/run/expert/1/0")
    assert r.status_code == 400 and "damaged" in r.text and matrix.name in r.text


def test_a_routing_run_without_statistics_still_serves_its_routing(study, cli, tmp_path):
    """Straight after `route` (no `stats` yet): a note says what to run; documents, typed text and
    expert contexts work; no statistic is shown that was not computed."""
    from fastapi.testclient import TestClient

    from deepseemoe.explore.app import Explorer, create_app

    meta = _run_meta(study)
    (tmp_path / "text.txt").write_text(TEXT)
    assert cli("route", meta["model"], "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "bare"),
               "--ctx-len", str(meta["ctx_len"])).code == 0
    client = TestClient(create_app(Explorer.open([tmp_path / "bare"])))
    r = client.get("/s/bare")
    assert r.status_code == 200 and "deepseemoe stats" in r.text and 'id="load"' not in r.text
    doc = client.get("/s/bare/doc/0")
    assert doc.status_code == 200
    api = client.get("/api/s/bare/route", params={"text": TEXT}).json()
    assert strip_cells(doc.text, "strip") == {int(k): v for k, v in api["experts"].items()}
    assert client.get("/s/bare/expert/1/0").status_code == 200
    assert client.get("/s/bare/doc/0", params={"start": 10_000}).status_code == 400


def test_serve_refuses_a_taken_port_and_a_missing_run_in_one_line(study, cli, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("serve", str(study), "--port", str(port))
    assert r.code == 2 and len(r.error_lines) == 1 and f"127.0.0.1:{port}" in r.error_lines[0]
    r = cli("serve", str(tmp_path / "nothing"))
    assert r.code == 2 and len(r.error_lines) == 1 and "routing run" in r.error_lines[0]


def test_playground_feature_edit_gives_steers_number(study, client, cli, tmp_path):
    """Ablating and doubling a feature of the block-input SAE on typed text: the ΔCE and KL that
    `deepseemoe steer` measures on the same text (its files: steering/NAME/f…_x….json)."""
    run = study / "dictionaries"
    name = next(p.name for p in (run / "maps").iterdir() if p.name.startswith("sae_block_in"))
    feature = duckdb.sql(f"SELECT feature FROM read_parquet('{run}/maps/{name}/features.parquet') "
                         "ORDER BY fires DESC, feature LIMIT 1").fetchall()[0][0]  # the one that fires most
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": TEXT, "domain": "typed"}) + "\n")
    for scale in (0.0, 2.0):
        steer_run = tmp_path / f"copy{scale:g}"  # steer writes into the run: a copy keeps the study as it was
        shutil.copytree(run, steer_run)
        res = cli("steer", str(steer_run), "--dictionary", name, "--feature", str(feature), "--scale", str(scale),
                  "--data", str(tmp_path / "text.jsonl"))
        assert res.code == 0, res.err
        (out,) = (steer_run / "steering" / name).glob("*.json")
        expected = json.loads(out.read_text())["results"][0]
        assert expected["fired_tokens"] > 0 and abs(expected["delta_ce"]) > 1e-6  # an edit that changes something
        api = client.get("/api/s/demo/playground", params={"text": TEXT, "op": "feature", "dictionary": f"dictionaries.{name}",
                                                           "feature": feature, "scale": scale}).json()
        assert api["delta_ce"] == pytest.approx(expected["delta_ce"], rel=1e-4, abs=1e-9), (scale, api, expected)
        assert api["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-9)
        assert api["fired"] == expected["fired_tokens"]


def test_playground_says_when_a_feature_never_fired(study, client):
    """On a two-token text a TopK SAE fires at most 2k of its features: editing one that stays silent
    changes nothing, and the page says so instead of a bare ΔCE of 0."""
    run = study / "dictionaries"
    name = next(p.name for p in (run / "maps").iterdir() if p.name.startswith("sae_block_in"))
    params = {"text": "Hello there", "op": "feature", "dictionary": name, "scale": 0}
    for feature in range(64):
        api = client.get("/api/s/demo/playground", params={**params, "feature": feature}).json()
        if api["fired"] == 0:
            break
    assert api["fired"] == 0 and api["delta_ce"] == 0 and api["kl"] == 0
    page = client.get("/s/demo/playground", params={**params, "feature": feature})
    assert 'id="never-fired"' in page.text and f"Feature {feature} never fired" in page.text


def test_graph_json_is_the_graph_files(study, client):
    """What the WebGL view draws is graphs/NAME/{nodes,edges}.parquet: every laid-out node at its stored
    position with its module and link, every edge between two of them."""
    import pyarrow.parquet as pq

    for g in study.glob("*/graphs/*/summary.json"):
        key = g.parent.name  # one dictionary run in the study: the name `map` and `graph` take
        page = client.get(f"/s/demo/graph/{key}")
        assert page.status_code == 200 and '<canvas id="graph"' in page.text
        old_key = f"{g.parent.parent.parent.name}.{key}"  # the key of earlier versions: still served
        assert client.get(f"/s/demo/graph/{old_key}").status_code == 200
        data = client.get(f"/api/s/demo/graph/{key}").json()
        nodes = pq.read_table(g.parent / "nodes.parquet").to_pylist()
        placed = [n for n in nodes if n["x"] is not None]
        assert placed and data["node"] == [n["node"] for n in placed]
        assert data["x"] == [n["x"] for n in placed] and data["module"] == [n["module"] for n in placed]
        layer = json.loads(g.read_text()).get("layer", data["layer"])
        for name, kind, link in zip(data["node"], data["kind"], data["link"], strict=True):
            want = f"/s/demo/expert/{layer}/{name[1:]}" if kind == "expert" else f"/s/demo/feature/{key}/{name[1:]}"
            assert link == want
        edges = {(e["u"], e["v"]) for e in pq.read_table(g.parent / "edges.parquet").to_pylist()}
        drawn = {(data["node"][a], data["node"][b]) for a, b in data["edges"]}
        index = set(data["node"])
        assert drawn == {(u, v) for u, v in edges if u in index and v in index}
        assert sorted(i for m in data["modules"] for i in m["nodes"]) == list(range(len(placed)))


def test_demo_dictionaries_have_the_readmes_automatic_names_and_the_old_ones_still_work(study, client, cli, tmp_path):
    """The demo's dictionaries are named as `train` names them (sae_block_in_L, skip_transcoder_L), the
    names the README's commands use; the names of earlier demos (router_sae_L, block_transcoder_L) are
    hidden aliases: verbs take them with a warning, the explorer serves them."""
    import shutil

    names = sorted(p.name for p in (study / "dictionaries" / "dictionaries").iterdir())
    layer = int(names[0].rsplit("_", 1)[1])
    assert names == [f"sae_block_in_{layer}", f"skip_transcoder_{layer}"]
    run = tmp_path / "dictionaries"  # a copy: the session's study stays as the other tests read it
    shutil.copytree(study / "dictionaries", run)
    r = cli("map", run, "--dictionary", f"router_sae_{layer}", "--tokens", "64")
    assert r.code == 0, r.err
    assert f"'router_sae_{layer}' is now called 'sae_block_in_{layer}'" in r.err
    assert not (run / "maps" / f"router_sae_{layer}").exists()  # the map went where the coder is
    assert (run / "maps" / f"sae_block_in_{layer}" / "summary.json").stat().st_mtime > \
        (study / "dictionaries" / "maps" / f"sae_block_in_{layer}" / "summary.json").stat().st_mtime
    r = cli("map", run, "--dictionary", "router_sae_99", "--tokens", "64")  # no such dictionary, old name or not
    assert r.code == 2 and "warning" not in r.err and "router_sae_99" in r.err
    for old, new in ((f"router_sae_{layer}", f"sae_block_in_{layer}"),
                     (f"block_transcoder_{layer}", f"skip_transcoder_{layer}")):
        page, want = client.get(f"/s/demo/feature/{old}/0"), client.get(f"/s/demo/feature/{new}/0")
        assert page.status_code == 200 and page.text == want.text


def test_expert_pages_describe_only_the_studys_own_experts(study):
    """The demo describes the carved MoE's experts (study/carved/clustered/explanations/layer1): the
    tiny recipe's carve and trained MoE both have a layer 1, and the trained MoE's expert pages must not
    show the carved model's descriptions."""
    from deepseemoe.explore.views import StudyView

    carved = study / "carved" / "clustered" / "explanations" / "layer1"
    assert (carved / "examples.json").exists()
    view = StudyView("demo", study)
    assert all(s.path.resolve().is_relative_to((study / "run").resolve()) for s in view.expert_stores.values())


def test_attribution_graph_page_links_its_nodes_to_their_pages(study, client):
    """Each demo prompt's graph is listed on the overview and drawn on its own page: every kept routing
    decision and expert of the graph file is a link to that expert's page, every kept feature to its
    feature page (served), and hovering a feature shows its description when `explain` wrote one."""
    index = json.loads((study / "attribution" / "attribution.json").read_text())
    overview = client.get("/s/demo").text
    for g in index["graphs"]:
        assert f'href="/s/demo/attribution/{g["slug"]}"' in overview
    docs = {g["slug"]: json.loads((study / "attribution" / g["file"]).read_text()) for g in index["graphs"]}
    # the graph with the most described features
    g = max(index["graphs"], key=lambda g: sum(bool(n["clerp"]) for n in docs[g["slug"]]["nodes"]
                                                if n["feature_type"] == "cross layer transcoder"))
    doc = docs[g["slug"]]
    page = client.get(f"/s/demo/attribution/{g['slug']}")
    assert page.status_code == 200
    links = re.findall(r'<a href="([^"]+)"><g class="node node-(\w+)"><title>([^<]*)</title>', page.text)
    wanted = {(f"/s/demo/expert/{n['layer']}/{n['node_id'][1:].split('_')[1]}", "router" if n["node_id"][0] == "R" else "expert")
              for n in doc["nodes"] if n["feature_type"] in ("moe router", "moe expert")}
    wanted |= {(f"/s/demo/feature/{n['dictionary']}/{n['node_id'].split('_')[1]}", "feature")
               for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert {(href, kind) for href, kind, _ in links} == wanted
    for href, _ in sorted(wanted)[:3]:
        assert client.get(href).status_code == 200
    for n in doc["nodes"]:
        if n["feature_type"] == "cross layer transcoder" and n["clerp"]:
            assert any(html.escape(n["clerp"]) in html.unescape(t) or n["clerp"] in html.unescape(t) for _, _, t in links)
    assert client.get("/s/demo/attribution/no-such-prompt").status_code == 404
