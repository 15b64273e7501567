"""Every verb that loads a model takes the placement flags a user looks for (--device-map, and
--dtype / --ctx-len on train), and hands them to the loader."""

from __future__ import annotations

import yaml

import deepseemoe.models.load as load


def test_every_model_loading_verb_passes_device_map_to_the_loader(tmp_path, cli, corpus_jsonl, monkeypatch):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 8) + "\n")
    seen: list[tuple[str, object]] = []
    real = load.load_model

    def spy(name, **kw):
        seen.append((name, kw.get("device_map")))
        return real(name, **kw)

    monkeypatch.setattr(load, "load_model", spy)
    run = tmp_path / "dicts"
    r = cli("train", "--model", "tiny:olmoe", "--data", data, "--kind", "sae", "--site", "block_in", "--layers", "1",
            "--out", run, "--tokens", "1024", "--ctx-len", "24", "--dtype", "bfloat16", "--device-map", "cpu")
    assert r.code == 0, r.err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["ctx_len"], saved["dtype"], saved["device_map"]) == (24, "bfloat16", "cpu")
    commands = [
        ("evaluate", run, "--tokens", "300"),
        ("map", run, "--dictionary", "sae_block_in_1", "--tokens", "300"),
        ("steer", run, "--dictionary", "sae_block_in_1", "--feature", "3", "--scale", "0", "--tokens", "300"),
        ("latents", run, "--tokens", "300"),
        ("ablate", "tiny:olmoe", "--data", data, "--out", tmp_path / "ablate", "--tokens", "200", "--ctx-len", "32",
         "--layers", "1", "--experts", "0,1"),
        ("compare", "tiny:olmoe", "tiny:llama", "--data", data, "--out", tmp_path / "cmp", "--tokens", "300",
         "--ctx-len", "32", "--sae-tokens", "0", "--max-units", "2"),
        ("route", "tiny:olmoe", "--data", data, "--out", tmp_path / "route", "--max-tokens", "300"),
    ]
    for args in commands:
        seen.clear()
        r = cli(*args, "--device-map", "cpu")
        assert r.code == 0, (args[0], r.err)
        assert seen and all(device_map == "cpu" for _, device_map in seen), (args[0], seen)


def test_long_verbs_show_a_progress_bar_with_rate_and_eta(tmp_path, cli, corpus_jsonl):
    """Bars go to stderr (results stay clean on stdout) and carry done/total, a rate and an ETA."""
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 8) + "\n")
    run = tmp_path / "dicts"
    assert cli("train", "--model", "tiny:olmoe", "--data", data, "--kind", "sae", "--site", "block_in",
               "--layers", "1", "--out", run, "--tokens", "1024").code == 0
    assert cli("route", "tiny:olmoe", "--data", data, "--out", tmp_path / "route", "--max-tokens", "300").code == 0
    commands = {
        "latents sae_block_in_1": ("latents", run, "--tokens", "300"),
        "mapping": ("map", run, "--dictionary", "sae_block_in_1", "--tokens", "300"),
        "feature 3 ×0": ("steer", run, "--dictionary", "sae_block_in_1", "--feature", "3", "--scale", "0",
                         "--tokens", "300"),
        "routing statistics": ("stats", tmp_path / "route"),
        "moe: ablations": ("compare", "tiny:olmoe", "tiny:llama", "--data", data, "--out", tmp_path / "cmp",
                           "--tokens", "300", "--ctx-len", "32", "--sae-tokens", "0", "--max-units", "2"),
        "evaluating": ("evaluate", run, "--tokens", "300"),
    }
    for description, args in commands.items():
        r = cli(*args)
        assert r.code == 0, r.err
        line = next((ln for ln in r.err.splitlines() if ln.startswith(description)), None)
        assert line is not None and "ETA" in line and "100%" in line, (args[0], r.err)
        assert description not in r.out
