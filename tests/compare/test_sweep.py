"""`deepseemoe sweep`: one CLT per reach at equal latents per layer and equal L0, every seed, on the
tiny OLMoE through the CLI. The table's rows are the means (and sample sds) of the seeds' own
evaluation.json, recomputed here; reach 0 writes only its own layer (spread 1 exactly); a rerun
reuses finished seeds; bad configs are one error line each, with nothing written."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

SWEEP = {"layers": [0, 1], "latents_per_layer": 64, "k": 4, "neighbours": [0, "all"], "seeds": [0, 1]}


def _config(tmp_path, tiny_olmoe_dir, corpus_jsonl, **sweep):
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        docs.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 20) + "\n")
    return {"model": str(tiny_olmoe_dir), "data": str(docs), "out": str(tmp_path / "sweep"), "tokens": 1024,
            "ctx_len": 32, "domain_field": "domain", "eval_tokens": 400,
            "train": {"batch_size": 256, "buffer_size": 512}, "sweep": {**SWEEP, **sweep}}


def test_sweep_table_is_the_seeds_evaluations_and_a_rerun_reuses_them(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_config(tmp_path, tiny_olmoe_dir, corpus_jsonl)))
    r = cli("sweep", tmp_path / "sweep.yaml")
    assert r.code == 0, r.err
    out = tmp_path / "sweep"
    table = json.loads((out / "table.json").read_text())
    evals = [json.loads((out / f"seed-{s}" / "evaluation.json").read_text())["coders"] for s in (0, 1)]
    for row in table["rows"]:
        fvus = [e[row["name"]]["fvu"] for e in evals]
        assert row["fvu"] == pytest.approx(statistics.mean(fvus)) and row["fvu_sd"] == pytest.approx(statistics.stdev(fvus))
        assert 7 < row["l0"] <= 4 * 2  # at most k per source layer × 2 layers (TopK drops non-positive codes)
    w0 = next(r for r in table["rows"] if r["reach"] == "0")
    assert w0["spread"] == 1.0 and w0["multi_layer"] == 0.0
    assert {p.name for p in (out / "figures").iterdir()} == {"reach.png", "fvu_per_layer.png"}
    assert table["elbow"] in ("0", "all") and "Elbow" in r.out
    assert sorted(p["layer"] for p in table["which_layer"]) == [0, 1] and "Which layer to pick" in r.out
    assert all(p["mean_rank"] is not None for p in table["which_layer"])
    again = cli("sweep", tmp_path / "sweep.yaml")
    assert again.code == 0 and "reused the finished seed(s) [0, 1]" in again.out
    # the same folder with other settings is refused, not mixed into this sweep
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(_config(tmp_path, tiny_olmoe_dir, corpus_jsonl, k=3)))
    other = cli("sweep", tmp_path / "other.yaml")
    assert other.code == 2 and len(other.error_lines) == 1 and "other settings" in other.error_lines[0]
    assert json.loads((out / "table.json").read_text()) == table


@pytest.mark.parametrize(("change", "message"), [
    ({"neighbours": [0, 2]}, "each a count from 0 to 1"),
    ({"neighbours": [1, "all"]}, "name one reach twice"),
    ({"layers": [3]}, "2 or more increasing layer indices"),
    ({"k": 100}, "equal L0 cannot be met"),
    ({"seeds": []}, "seeds must be a list"),
    ({"width": 3}, "unknown key"),
    ({"latents_per_layer": 20_000_000}, "GB of memory"),  # 2 CLTs of 6.4 B parameters: refused with the estimate
])
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl, change, message):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_config(tmp_path, tiny_olmoe_dir, corpus_jsonl, **change)))
    r = cli("sweep", tmp_path / "sweep.yaml")
    assert r.code == 2 and len(r.error_lines) == 1 and message in r.error_lines[0], r.err
    assert not (tmp_path / "sweep").exists()


def test_layers_outside_the_model_are_refused_before_anything_is_written(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_config(tmp_path, tiny_olmoe_dir, corpus_jsonl,
                                                                layers=[0, 7])))
    r = cli("sweep", tmp_path / "sweep.yaml")
    assert r.code == 2 and len(r.error_lines) == 1 and "layers [7] do not exist" in r.error_lines[0], r.err
    assert not (tmp_path / "sweep").exists()


def test_which_layer_to_pick_known_answers(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    """The layer profile on the tiny OLMoE with layer 0's experts silenced (down projections zeroed):
    ablating that layer's experts changes nothing, exactly; the domain NMI of each layer equals what
    `stats` computes on a `route` of the same text; the ranks follow the measures."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from deepseemoe.compare.sweep import SweepSettings, layer_profile, rank_layers
    from deepseemoe.routing.stats import compute_routing_stats

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_olmoe_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.zero_()
    model.save_pretrained(model_dir)
    config = _config(tmp_path, tiny_olmoe_dir, corpus_jsonl)
    config["model"] = str(model_dir)
    profile = layer_profile(SweepSettings.from_dict(config), tmp_path / "sweep")
    silent, live = profile
    assert silent["ablation_delta_ce"] == 0.0 and silent["ablation_kl"] == 0.0
    assert live["ablation_kl"] > 0 and live["ablation_delta_ce"] != 0.0

    r = cli("route", model_dir, "--data", config["data"], "--domain-field", "domain", "--out", tmp_path / "run",
            "--ctx-len", "32", "--batch-size", "8", "--max-tokens", "400")
    assert r.code == 0, r.err
    stats = compute_routing_stats(tmp_path / "run")
    for row in profile:
        assert row["domain_nmi"] == pytest.approx(stats.summary["layers"][str(row["layer"])]["domain_nmi"], abs=1e-12)
        assert row["domain_nmi_shuffled"] < row["domain_nmi"]

    picks = rank_layers(profile, [{"reach": "1", "fvu_per_layer": [0.1, 0.9]},
                                  {"reach": "0", "fvu_per_layer": [0.2, 0.4]}])
    by_layer = {p["layer"]: p for p in picks}
    assert by_layer[0]["fvu"] == 0.2 and by_layer[0]["fvu_rank"] == 1 and by_layer[1]["fvu_rank"] == 2  # reach 0's
    ce_first = max(profile, key=lambda p: p["ablation_delta_ce"])["layer"]
    assert by_layer[ce_first]["ablation_delta_ce_rank"] == 1
    assert picks[0]["mean_rank"] <= picks[1]["mean_rank"]


def test_sae_and_crosscoder_rows_at_equal_totals(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    """kinds: [clt, sae, crosscoder] — one SAE per layer on the block outputs (spliced all at once) and a
    crosscoder over them, at the CLTs' total latents and L0; their rows are the seeds' own evaluations."""
    cfg = _config(tmp_path, tiny_olmoe_dir, corpus_jsonl, kinds=["clt", "sae", "crosscoder"])
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("sweep", tmp_path / "sweep.yaml")
    assert r.code == 0, r.err
    out = tmp_path / "sweep"
    table = json.loads((out / "table.json").read_text())
    evals = [json.loads((out / f"seed-{s}" / "evaluation.json").read_text()) for s in (0, 1)]
    for e in evals:  # the same totals: 64 latents × 2 layers, L0 at most 4 per layer × 2
        assert e["coders"]["crosscoder_block_out"]["n_latents"] == 128
        assert sum(e["coders"][f"sae_block_out_{la}"]["n_latents"] for la in (0, 1)) == 128
        assert e["together"]["sae"]["coders"] == ["sae_block_out_0", "sae_block_out_1"]
    rows = {o["kind"]: o for o in table["other_kinds"]}
    sae = rows["sae"]
    fvus = [statistics.mean(e["coders"][f"sae_block_out_{la}"]["fvu"] for la in (0, 1)) for e in evals]
    assert sae["fvu"] == pytest.approx(statistics.mean(fvus)) and sae["fvu_sd"] == pytest.approx(statistics.stdev(fvus))
    assert sae["delta_ce"] == pytest.approx(statistics.mean(e["together"]["sae"]["delta_ce"] for e in evals))
    assert 7 < sae["l0"] <= 8 and 7 < rows["crosscoder"]["l0"] <= 8
    cc = [statistics.mean(e["coders"]["crosscoder_block_out"]["fvu_per_site"]) for e in evals]
    assert rows["crosscoder"]["fvu"] == pytest.approx(statistics.mean(cc))
    assert rows["crosscoder"]["delta_ce"] is None or rows["crosscoder"]["delta_ce"] != rows["crosscoder"]["delta_ce"]
    assert "Other kinds at the same total latents and L0" in r.out and "One SAE per layer" in r.out


def test_bad_kinds_are_refused(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    for kinds in (["sae"], ["clt", "clt"], ["clt", "transcoder"]):
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_config(tmp_path, tiny_olmoe_dir, corpus_jsonl, kinds=kinds)))
        r = cli("sweep", tmp_path / "sweep.yaml")
        assert r.code == 2 and len(r.error_lines) == 1 and "kinds must list clt" in r.error_lines[0], r.err
        assert not (tmp_path / "sweep").exists()


def _balanced_accuracy(records: list[dict]) -> float:
    """By hand: (TPR + TNR) / 2 over the answered examples."""
    answered = [r for r in records if r["prediction"] is not None]
    pos = [r for r in answered if r["activating"]]
    neg = [r for r in answered if not r["activating"]]
    return (sum(bool(r["prediction"]) for r in pos) / len(pos) + sum(not r["prediction"] for r in neg) / len(neg)) / 2


def test_autointerp_columns_are_the_stores_scores_and_a_rerun_asks_nothing(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl):
    """sweep.autointerp: features of every row explained by an oracle (over the OpenAI protocol) and judged
    by detection beside shuffled descriptions; each row's cell is the balanced accuracy of its dictionaries'
    stored judgements, computed here by hand; a rerun reuses the stores and sends no request."""
    from deepseemoe.runs.explanations import ExplanationStore
    from tests.explain.stub_server import Stub

    with Stub() as stub:
        ai = {"features": 2, "seeds": [0], "backend": "openai", "url": stub.url, "model": "oracle", "tokens": 1500}
        cfg = _config(tmp_path, tiny_olmoe_dir, corpus_jsonl, seeds=[0], kinds=["clt", "sae"], autointerp=ai)
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
        r = cli("sweep", tmp_path / "sweep.yaml")
        assert r.code == 0, r.err
        asked = stub.requests
        assert asked > 0
        out = tmp_path / "sweep"
        table = json.loads((out / "table.json").read_text())
        rows = {row["name"]: row for row in table["rows"]} | {o["kind"]: o for o in table["other_kinds"]}
        coders = {"clt_w0": ["clt_w0"], "clt_all_later": ["clt_all_later"], "sae": ["sae_block_out_0", "sae_block_out_1"]}
        own_all, base_all = [], []
        for row, names in coders.items():
            own, base = [], []
            for name in names:
                store = ExplanationStore.for_features(out / "seed-0", name)
                judged = store.scores("detection")
                assert len(judged) == 2 and len(store.explanations()) == 2  # two each: a shuffled baseline needs two
                own.append(_balanced_accuracy([rec for recs in judged.values() for rec in recs]))
                base.append(_balanced_accuracy([rec for recs in store.scores("detection_shuffled").values()
                                                for rec in recs]))
            assert rows[row]["detection"] == pytest.approx(statistics.mean(own))
            assert rows[row]["detection_shuffled"] == pytest.approx(statistics.mean(base))
            own_all += own
            base_all += base
        # (whether the oracle beats the shuffled baseline depends on the features: a barely trained dictionary of
        # a random-weight model has none to name; tests/explain plants them and finds > 0.95 against chance)
        assert all(0 <= v <= 1 for v in own_all + base_all)
        assert "| detection | detection, shuffled |" in (out / "table.md").read_text()
        # the report's section shows the two columns, each cell the table's value
        from deepseemoe.report.html import _sweep
        from deepseemoe.runs.study import Result
        from deepseemoe.runs.sweep import SweepRun

        run = SweepRun.open(out)
        section = _sweep(Result(out, {"settings": run.settings(), **run.table()}, run.figures()), "sweep")
        assert section["columns"][-2:] == ["detection", "detection, shuffled"]
        assert section["other_columns"][-2:] == ["detection", "detection, shuffled"]
        for shown, row in zip(section["rows"], table["rows"], strict=True):
            assert shown["cells"][-2] == f"{row['detection']:.3f}"
        again = cli("sweep", tmp_path / "sweep.yaml")
        assert again.code == 0 and stub.requests == asked
        assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


@pytest.mark.parametrize(("autointerp", "message"), [
    ({"features": 0}, "features must be a positive integer"),
    ({"seeds": [5]}, "seeds must be some of the sweep's seeds"),
    ({"scorers": ["routing"]}, "scorers must list some of"),
    ({"backend": "embedding"}, "a judge, not an explainer"),
    ({"backend": "openai"}, "--backend openai needs --url"),
    ({"colour": 1}, "autointerp: unknown key"),
])
def test_bad_autointerp_is_one_line_and_trains_nothing(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl, autointerp, message):
    cfg = _config(tmp_path, tiny_olmoe_dir, corpus_jsonl, autointerp=autointerp)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("sweep", tmp_path / "sweep.yaml")
    assert r.code == 2 and len(r.error_lines) == 1 and message in r.error_lines[0], r.err
    assert not (tmp_path / "sweep").exists()


def test_dictionaries_too_quiet_to_explain_leave_their_cells_empty(tmp_path, cli, tiny_olmoe_dir, corpus_jsonl,
                                                                   monkeypatch):
    """A dictionary none of whose features fires often enough on the autointerp text gets no score: the
    sweep still writes its table (no autointerp column) instead of failing after every seed trained."""
    import math

    from deepseemoe.explain import pipeline
    from tests.explain.stub_server import Stub

    monkeypatch.setattr(pipeline, "MIN_FIRINGS", 10**9)  # nothing fires that often
    with Stub() as stub:
        ai = {"features": 2, "seeds": [0], "backend": "openai", "url": stub.url, "model": "oracle", "tokens": 500}
        cfg = _config(tmp_path, tiny_olmoe_dir, corpus_jsonl, seeds=[0], autointerp=ai)
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
        r = cli("sweep", tmp_path / "sweep.yaml")
        assert r.code == 0, r.err
        assert stub.requests == 0
    table = json.loads((tmp_path / "sweep" / "table.json").read_text())
    assert all(math.isnan(row["detection"]) for row in table["rows"])
    assert "detection" not in (tmp_path / "sweep" / "table.md").read_text()
