"""`deepseemoe attribute` on a trained run: the file circuit-tracer's own models read, the sentence it
prints, and one `error:` line (exit 2, nothing written) for each bad input."""

from __future__ import annotations

import json

from tests.faults.conftest import assert_refused, small_run  # noqa: F401  (the session fixture)

PROMPT = "def add(a, b): return a + b"


def _name(run):
    return next((run / "dictionaries").iterdir()).name


def test_attribute_writes_a_graph_circuit_tracers_models_read(cli, small_run, tmp_path):  # noqa: F811
    from circuit_tracer.frontend.graph_models import Model

    out = tmp_path / "g" / "graph.json"
    r = cli("attribute", small_run, "--dictionary", _name(small_run), "--prompt", PROMPT, "--out", out)
    assert r.code == 0, r.err
    doc = json.loads(out.read_text())
    model = Model(**doc)  # circuit-tracer's own schema of the file (what its frontend serves)
    types = {n.feature_type for n in model.nodes}
    assert {"embedding", "logit", "moe router", "moe expert"} <= types
    ids = {n.node_id for n in model.nodes}
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert any(link["kind"] == "gate" for link in doc["links"])
    assert sum(n.is_target_logit for n in model.nodes) == 1
    assert doc["metadata"]["transcoder_list"] == [_name(small_run)]
    assert 0 < doc["metadata"]["deepseemoe"]["kept_influence"] <= 1
    assert "The strongest routing decision sends" in r.out and "→" in r.out


def test_a_target_token_is_the_target_logit(cli, small_run, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    config = (small_run / "config.yaml").read_text()
    model_dir = next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.startswith("model:"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    target = tok.decode([tok(" b", add_special_tokens=False)["input_ids"][0]])
    out = tmp_path / "graph.json"
    r = cli("attribute", small_run, "--dictionary", _name(small_run), "--prompt", PROMPT, "--target", target,
            "--out", out)
    assert r.code == 0, r.err
    (node,) = [n for n in json.loads(out.read_text())["nodes"] if n["is_target_logit"]]
    assert node["feature"] == tok(target, add_special_tokens=False)["input_ids"][0]


def test_bad_inputs_are_one_line_and_write_nothing(cli, small_run, tmp_path):  # noqa: F811
    name = _name(small_run)
    out = tmp_path / "graph.json"
    common = ["--dictionary", name, "--out", out]
    assert_refused(cli("attribute", small_run, *common, "--prompt", "   "), "--prompt is empty")
    assert_refused(cli("attribute", small_run, *common, "--prompt", "x " * 3000), "--prompt is", "positions")
    assert_refused(cli("attribute", small_run, *common, "--prompt", PROMPT, "--target", "return a + b"),
                   "--target", "tokens")
    assert_refused(cli("attribute", small_run, "--dictionary", "nope", "--out", out, "--prompt", PROMPT),
                   "no dictionary 'nope'")
    assert_refused(cli("attribute", small_run, "--dictionary", name, "--out", tmp_path / "graph.txt",
                       "--prompt", PROMPT), ".json")
    assert_refused(cli("attribute", small_run, *common, "--prompt", PROMPT, "--node-threshold", "1.5"),
                   "--node-threshold")
    assert not out.exists() and not (tmp_path / "graph.txt").exists()


def test_a_dictionary_off_the_block_input_is_named_and_the_rest_is_built():
    """An SAE on the residual stream cannot give router edges (the router reads the normed block input):
    the graph is built without it, and says so."""
    import torch

    from deepseemoe.attribution.graph import build_graph
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    handle = handle_from_model(tiny_model("olmoe").eval())
    sae = build_coder(CoderConfig(d_in=64, n_latents=32, k=4)).eval()
    graph = build_graph(handle, torch.tensor([1, 5, 9, 13]),
                        {"resid": (sae, {"kind": "sae", "source": [["resid_in", 1]], "target": [["resid_in", 1]]})})
    assert graph.summary["notes"] == ["resid reads resid_in of layer 1, not a block input: router edges need the "
                                      "router's own input, so the graph is built without it"]
    assert not graph.of_kind("feature") and graph.of_kind("router")


def test_max_nodes_bounds_the_graph_and_circuit_tracers_models_still_read_it(cli, small_run, tmp_path):  # noqa: F811
    from circuit_tracer.frontend.graph_models import Model

    out = tmp_path / "bounded.json"
    r = cli("attribute", small_run, "--dictionary", _name(small_run), "--prompt", PROMPT, "--out", out,
            "--max-nodes", "10")
    assert r.code == 0, r.err
    assert "bounded: " in r.out and "(--max-nodes 10)" in r.out
    doc = json.loads(out.read_text())
    Model(**doc)
    kinds = [n for n in doc["nodes"] if n["feature_type"] in ("cross layer transcoder", "moe router", "moe expert")]
    assert 0 < len(kinds) <= 10
    assert_refused(cli("attribute", small_run, "--dictionary", _name(small_run), "--prompt", PROMPT,
                       "--out", tmp_path / "x.json", "--max-nodes", "0"), "--max-nodes")


def test_a_cross_layer_transcoder_from_a_run(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    """`attribute --dictionary` of a CLT trained by `train`: its features replace every block it spans
    (no routing nodes there), ids number them within their layer as circuit-tracer does, `latent` is the
    CLT's own number (its feature page); beside an SAE on a layer it already explains: one line."""
    import yaml
    from circuit_tracer.frontend.graph_models import Model

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(corpus_jsonl.read_text() * 10)
    config = {"model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(tmp_path / "run"), "tokens": 256,
              "ctx_len": 32, "batch_size": 4,
              "coders": [{"kind": "clt", "layers": "all", "k": 4, "expansion_factor": 2, "name": "clt"},
                         {"kind": "sae", "layers": [1], "site": "block_in", "k": 4, "expansion_factor": 2,
                          "name": "sae"}],
              "train": {"batch_size": 64, "buffer_size": 128}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli("train", tmp_path / "run.yaml").code == 0
    out = tmp_path / "graph.json"
    r = cli("attribute", tmp_path / "run", "--dictionary", "clt", "--prompt", PROMPT, "--out", out,
            "--node-threshold", "1", "--edge-threshold", "1")
    assert r.code == 0, r.err
    doc = json.loads(out.read_text())
    model = Model(**doc)
    assert "moe router" not in {n.feature_type for n in model.nodes}
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert {int(n["layer"]) for n in feats} == {0, 1}
    per_layer = 2 * 64  # expansion 2 of d = 64 per site
    for n in feats:
        layer, in_layer, _pos = n["node_id"].split("_")
        assert n["latent"] == int(layer) * per_layer + int(in_layer) and n["dictionary"] == "clt"
    assert doc["metadata"]["transcoder_list"] == ["clt"]
    assert_refused(cli("attribute", tmp_path / "run", "--dictionary", "clt", "--dictionary", "sae", "--prompt", PROMPT,
                       "--out", tmp_path / "two.json"), "two dictionaries explain layer 1")
    assert not (tmp_path / "two.json").exists()
