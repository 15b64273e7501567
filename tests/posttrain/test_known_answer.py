"""post-train on a hand-set MoE with a planted answer (tests/posttrain/planted.py), driven through the CLI:
the hint picks the one expert that serves the target family, experts-by-hint changes that expert's weights
and nothing else, router-by-hint moves exactly the family tokens that were routed elsewhere toward it and
leaves every other token's routing as it was (read from a plain Hugging Face forward of the saved model),
and random-experts trains experts the hint did not name."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.posttrain.planted import FAMILY, MOVABLE, documents, model_folder, planted_sae, top1

ALL_IDS = [1, *range(10, 40)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from typer.testing import CliRunner

    from deepseemoe.cli import app

    root = tmp_path_factory.mktemp("posttrain_planted")
    model = model_folder(root / "model")
    train = documents(root / "train.jsonl", 240, seed=0)
    held = documents(root / "eval.jsonl", 60, seed=1)
    config = {"model": str(model), "data": str(train), "domain_field": "domain", "out": str(root / "dict"),
              "coders": [{"kind": "sae", "layers": [0], "site": "block_in", "activation": "relu",
                          "expansion_factor": 2, "name": "hint"}],
              "tokens": 2048, "ctx_len": 32, "batch_size": 8, "train": {"batch_size": 256, "buffer_size": 512}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(root / "run.yaml")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    planted_sae(root / "dict", "hint")
    r = runner.invoke(app, ["map", str(root / "dict"), "--dictionary", "hint", "--tokens", "3000"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = root / "post"
    r = runner.invoke(app, ["post-train", str(model), "--data", str(train), "--eval", str(held), "--out", str(out),
                            "--target-domain", "a", "--hint", f"{root / 'dict'}:hint", "--experts", "1",
                            "--strategy", "experts-by-hint,router-by-hint,random-experts", "--seeds", "2",
                            "--steps", "30", "--lr", "0.05", "--rank", "2", "--ctx-len", "32", "--batch-size", "4",
                            "--train-tokens", "2000", "--eval-tokens", "1500"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root, model, out


def test_the_planted_routing_holds_in_the_base_model(planted):
    from transformers import AutoModelForCausalLM

    _, model, _ = planted
    base = AutoModelForCausalLM.from_pretrained(model)
    got = dict(zip(ALL_IDS, top1(base, ALL_IDS), strict=True))
    assert {got[i] for i in FAMILY if i not in MOVABLE} == {1}
    assert {got[i] for i in MOVABLE} == {3}
    assert {got[i] for i in range(20, 30)} == {0} and {got[i] for i in range(30, 40)} == {2} and got[1] == 0


def test_the_hint_is_the_family_feature_and_the_expert_that_serves_it(planted):
    _, _, out = planted
    hint = json.loads((out / "posttrain.json").read_text())["hint"]
    assert hint["layer"] == 0 and hint["features"] == [0]
    assert hint["experts"] == [1]


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _changed(base: dict, after: dict) -> tuple[set[int], list[str]]:
    """(experts whose weights changed, other tensors that changed). transformers saves fused experts
    one tensor per expert (…mlp.experts.E.down_proj.weight)."""
    assert after.keys() == base.keys()
    experts, others = set(), []
    for name, w in base.items():
        if torch.equal(after[name], w):
            continue
        if ".mlp.experts." in name:
            experts.add(int(name.split(".mlp.experts.")[1].split(".")[0]))
        else:
            others.append(name)
    return experts, others


def test_experts_by_hint_changes_the_hinted_expert_and_nothing_else(planted):
    _, model, out = planted
    base = _weights(model)
    for seed in (0, 1):
        experts, others = _changed(base, _weights(out / "points" / f"experts-by-hint-seed{seed}" / "model"))
        assert experts == {1} and others == []


def test_random_experts_trains_experts_the_hint_did_not_name(planted):
    _, model, out = planted
    base = _weights(model)
    picks = []
    for seed in (0, 1):
        doc = json.loads((out / "points" / f"random-experts-seed{seed}" / "result.json").read_text())
        picks.append(doc["experts"])
        experts, others = _changed(base, _weights(out / "points" / f"random-experts-seed{seed}" / "model"))
        assert experts <= set(doc["experts"]) and len(doc["experts"]) == 1 and others == []
    assert any(p != [1] for p in picks)


def test_router_by_hint_moves_exactly_the_hinted_tokens(planted):
    from transformers import AutoModelForCausalLM

    _, model, out = planted
    before = dict(zip(ALL_IDS, top1(AutoModelForCausalLM.from_pretrained(model), ALL_IDS), strict=True))
    for seed in (0, 1):
        folder = out / "points" / f"router-by-hint-seed{seed}" / "model"
        after = dict(zip(ALL_IDS, top1(AutoModelForCausalLM.from_pretrained(folder), ALL_IDS), strict=True))
        assert {after[i] for i in FAMILY} == {1}, after  # the family's stragglers moved to the hinted expert
        assert all(after[i] == before[i] for i in ALL_IDS if i not in FAMILY)  # nobody else moved
        doc = json.loads((folder.parent / "result.json").read_text())
        held = doc["hint_held"]
        assert held["hint_routed_before"] < 1.0 and held["hint_routed_after"] == 1.0
        assert held["other_drift"] == 0.0 and held["other_routed_after"] == 0.0
