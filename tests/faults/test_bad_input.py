"""Every bad input is one `error:` line with exit code 2 (Ctrl-C: 130), never a traceback, and
leaves nothing half-written: out-of-range values, bad configs, damaged inputs of every kind the
project reads, unwritable or hostile output paths, changed settings on --resume, interrupts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.conftest import assert_refused

# ---- out-of-range values on the command line ---------------------------------------------------


@pytest.mark.parametrize(("verb", "flag", "value"), [
    ("evaluate", "--tokens", "0"), ("evaluate", "--batch-size", "0"), ("latents", "--n-splits", "0"),
    ("map", "--tokens", "-100"), ("steer", "--batch-size", "-1"), ("latents", "--tokens", "zero"),
])
def test_out_of_range_option_on_a_run(cli, run_copy, verb, flag, value):
    extra = ["--dictionary", "x"] if verb == "map" else ["--dictionary", "x", "--feature", "0"] if verb == "steer" else []
    assert_refused(cli(verb, run_copy, *extra, flag, value), flag)


def test_out_of_range_layers_experts_and_context(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    common = [tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "a", "--tokens", "64", "--ctx-len", "16"]
    assert_refused(cli("ablate", *common, "--layers", "99"), "99", "not MoE layers")
    assert_refused(cli("ablate", *common, "--experts", "42"), "42", "do not exist")
    assert_refused(cli("ablate", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "a",
                       "--ctx-len", "100000"), "--ctx-len", "max_position_embeddings")
    assert_refused(cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", tmp_path / "r",
                       "--ctx-len", "100000"), "--ctx-len")
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()


def test_without_ctx_len_the_verbs_fit_the_models_positions(cli, corpus_jsonl, tmp_path):
    """A model with 48 positions (the demo's have 128): route, ablate and train without --ctx-len
    use its limit instead of a fixed 256 that fails after the model has loaded."""
    import json

    from deepseemoe.models.tiny import tiny_model
    from tests.conftest import build_tokenizer

    folder = tmp_path / "short"
    tok = build_tokenizer(folder)
    tiny_model("olmoe", vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, max_position_embeddings=48).save_pretrained(folder)
    r = cli("route", folder, "--data", corpus_jsonl, "--out", tmp_path / "r", "--max-tokens", "300")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["ctx_len"] == 48
    r = cli("ablate", folder, "--data", corpus_jsonl, "--out", tmp_path / "a", "--tokens", "96", "--layers", "1",
            "--experts", "0")
    assert r.code == 0, r.err
    r = cli("train", "--model", folder, "--data", corpus_jsonl, "--kind", "sae", "--layers", "1", "--out",
            tmp_path / "d", "--tokens", "256", "--k", "4")
    assert r.code == 0, r.err


def test_features_and_layers_a_dictionary_lacks(cli, run_copy):
    name = next((run_copy / "dictionaries").iterdir()).name
    assert_refused(cli("steer", run_copy, "--dictionary", name, "--feature", "99999", "--tokens", "64"), "99999")
    assert_refused(cli("map", run_copy, "--dictionary", name, "--layer", "99", "--tokens", "64"), "--layer 99")
    assert not (run_copy / "steering").exists() and not (run_copy / "maps").exists()


# ---- run configs ----------------------------------------------------------------------------------


def _config(tiny_olmoe_dir, corpus_jsonl, out, **changes) -> dict:
    config = {"model": str(tiny_olmoe_dir), "corpus": str(corpus_jsonl), "out": str(out), "tokens": 256,
              "ctx_len": 32, "coders": [{"kind": "sae", "layers": [0], "k": 4, "expansion_factor": 2}],
              "train": {"batch_size": 64, "buffer_size": 128}}
    for key, value in changes.items():
        if key.startswith("coder."):
            config["coders"][0][key.removeprefix("coder.")] = value
        elif key.startswith("train."):
            config["train"][key.removeprefix("train.")] = value
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(("change", "words"), [
    ({"coder.k": "eight"}, ["`k`", "integer", "eight"]),
    ({"coder.layers": "x"}, ["layers"]),
    ({"batch_size": 0}, ["batch_size", "greater than 0"]),
    ({"tokens": -100}, ["tokens", "-100"]),
    ({"train.batch_size": 0}, ["batch_size", "greater than 0"]),
    ({"train.lr": "fast"}, ["lr"]),
    ({"coder.expansion_factr": 4}, ["expansion_factr", "unknown"]),
    ({"log": ["carrier-pigeon"]}, ["carrier-pigeon"]),
])
def test_bad_settings_in_a_config(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path, change, words):
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tiny_olmoe_dir, corpus_jsonl, out, **change)))
    assert_refused(cli("train", tmp_path / "c.yaml"), *words)
    assert not out.exists()


@pytest.mark.parametrize("text", ["- just\n- a list\n", "model: [unclosed\n", "\x00\x01binary"])
def test_a_config_that_is_not_a_yaml_mapping(cli, tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    assert_refused(cli("train", tmp_path / "c.yaml"), "c.yaml")


def test_a_logger_that_cannot_start_leaves_nothing(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")  # wandb.init raises: it cannot start
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tiny_olmoe_dir, corpus_jsonl, out, log=["wandb"])))
    assert_refused(cli("train", tmp_path / "c.yaml"), "wandb", "could not start")
    assert not out.exists()


def test_a_logger_that_is_not_installed_is_refused_before_the_model_loads(cli, corpus_jsonl, tmp_path):
    import importlib.util

    missing = next(n for n in ("trackio", "tensorboard") if importlib.util.find_spec(n) is None)
    out = tmp_path / "run"
    # a model folder that does not exist: the logger is refused first, so no model load is ever paid for
    config = _config(tmp_path / "no-model-here", corpus_jsonl, out, log=[missing])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_refused(cli("train", tmp_path / "c.yaml"), missing, f"deepseemoe[{missing}]")
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("seed", 7, "train.seed"), ("buffer_size", 512, "train.buffer_size"), ("expansion_factor", 4, "coders[0].expansion_factor"),
])
def test_resume_with_changed_settings_is_refused_by_name(cli, run_copy, flag, value, key):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    before = (run_copy / "config.yaml").read_bytes()
    if flag == "expansion_factor":
        config["coders"][0][flag] = value
    else:
        config["train"][flag] = value
    (run_copy.parent / "changed.yaml").write_text(yaml.safe_dump(config))
    result = cli("train", run_copy.parent / "changed.yaml", "--out", run_copy, "--resume")
    assert_refused(result, key, "--resume")
    assert (run_copy / "config.yaml").read_bytes() == before


def test_resume_keeps_one_metrics_line_per_step(cli, run_copy):
    """A run that died after its last checkpoint had already logged later steps; the resumed run
    logs them again, and metrics.jsonl must hold each (coder, step) once."""
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(len(steps)))  # metrics count steps from 0
    ghost = [json.dumps({**json.loads(lines[-1]), "step": s, "fvu": 9.9}) for s in (len(steps), len(steps) + 1)]
    metrics.write_text("\n".join([*lines, *ghost]) + "\n{\"coder\": \"cut sho")  # + a line cut by the kill
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    more = config["tokens"] + 2 * config["train"]["batch_size"]
    assert cli("train", run_copy / "config.yaml", "--out", run_copy, "--resume", "--tokens", more).code == 0
    after = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in after] == list(range(len(steps) + 2))
    assert all(m["fvu"] != 9.9 for m in after)


# ---- damaged inputs of every kind ----------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("rel", ["config.yaml", "dictionaries/*/config.json", "dictionaries/*/coder.safetensors",
                                 "checkpoint.safetensors"])
def test_damaged_training_run_files(cli, run_copy, rel):
    (path,) = run_copy.glob(rel)
    _truncate(path)
    verb = ["train", run_copy / "config.yaml", "--out", run_copy, "--resume"] if "checkpoint" in rel else ["evaluate", run_copy,
                                                                                       "--tokens", "64"]
    if rel == "config.yaml":
        verb = ["evaluate", run_copy, "--tokens", "64"]
    assert_refused(cli(*verb), path.name)


@pytest.mark.parametrize("foreign", ["pickle", "other tensors"])
def test_a_foreign_file_posing_as_the_coder_weights(cli, run_copy, foreign):
    """A pickle saved under coder.safetensors (its checksum updated, as a careless copy would leave
    it), or a safetensors file of other tensors: one error line naming the file, exit 2, and the
    pickle never loaded."""
    import hashlib
    import json
    import pickle

    (path,) = run_copy.glob("dictionaries/*/coder.safetensors")
    if foreign == "pickle":
        path.write_bytes(pickle.dumps({"W_enc": [1.0, 2.0]}))
    else:
        import torch
        from safetensors.torch import save_file

        save_file({"something": torch.zeros(3)}, str(path))
    config = path.parent / "config.json"
    doc = json.loads(config.read_text())
    doc["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    config.write_text(json.dumps(doc))
    assert_refused(cli("evaluate", run_copy, "--tokens", "64"), path.name)


@pytest.mark.parametrize("keep_lines", [5, 20])
def test_a_run_config_cut_at_a_line_end_is_refused(cli, run_copy, keep_lines):
    """Cut YAML at a line end still parses — to a config missing settings, which would silently run
    with defaults; the checksum line catches it."""
    path = run_copy / "config.yaml"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep_lines]))
    assert_refused(cli("evaluate", run_copy, "--tokens", "64"), "config.yaml")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_damaged_model_files(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path, name):
    model = tmp_path / "model"
    shutil.copytree(tiny_olmoe_dir, model)
    _truncate(model / name)
    result = cli("route", model, "--data", corpus_jsonl, "--out", tmp_path / "run")
    assert_refused(result)
    assert not (tmp_path / "run").exists()


def _corpus(tmp_path: Path, corpus_jsonl: Path, kind: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [json.loads(line) for line in corpus_jsonl.read_text().splitlines()]
    if kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        _truncate(path)
    elif kind == "zst":
        path = tmp_path / "c.jsonl.zst"
        data = zstandard.ZstdCompressor().compress(corpus_jsonl.read_bytes())
        path.write_bytes(data[: len(data) // 2])
    else:
        path = tmp_path / "c.jsonl"
        path.write_text(corpus_jsonl.read_text() + '{"text": "cut sh\n')
    return path


@pytest.mark.parametrize("kind", ["parquet", "zst", "jsonl"])
def test_damaged_corpus_files(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path, kind):
    path = _corpus(tmp_path, corpus_jsonl, kind)
    assert_refused(cli("route", tiny_olmoe_dir, "--data", path, "--out", tmp_path / "run"), path.name)
    assert not (tmp_path / "run").exists()


def test_damaged_activation_cache_manifest(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    cache = tmp_path / "acts"
    config = _config(tiny_olmoe_dir, corpus_jsonl, tmp_path / "run", activation_cache=str(cache))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli("train", tmp_path / "c.yaml").code == 0
    (manifest,) = cache.glob("*.json")
    _truncate(manifest)
    config["out"] = str(tmp_path / "run2")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_refused(cli("train", tmp_path / "c.yaml"), manifest.name)


# ---- output paths ---------------------------------------------------------------------------------


def test_out_that_is_a_file_or_unwritable(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    config = _config(tiny_olmoe_dir, corpus_jsonl, afile)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_refused(cli("train", tmp_path / "c.yaml"), "is a file")
    assert afile.read_text() == "x"
    unwritable = Path("/proc/deepseemoe-test/run")  # not even root can create folders in /proc
    assert_refused(cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", unwritable), "/proc")
    assert_refused(cli("ablate", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", unwritable, "--tokens", "64",
                       "--layers", "0", "--experts", "0"), "/proc")


def test_a_full_disk_leaves_nothing_half_written(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    out = tmp_path / "run"
    assert_refused(cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", out, "--ctx-len", "16"),
                   "no space left")
    assert not out.exists() and not any(p.name.startswith(".run.") and p.is_dir() for p in tmp_path.iterdir())
    assert not list(tmp_path.iterdir())  # nor the writer's lock file beside it


@pytest.mark.parametrize("existing", [False, True])
def test_a_train_that_fails_before_its_first_checkpoint_leaves_nothing(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path,
                                                                       monkeypatch, existing):
    """The disk fills during the first steps: no config.yaml or metrics.jsonl of a run that never
    started stays behind (in a folder of the user's, what else it held stays)."""
    import errno

    from deepseemoe.dictionaries.trainer import CoderTrainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(CoderTrainer, "fit", full)
    out = tmp_path / "run"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tiny_olmoe_dir, corpus_jsonl, out)))
    assert_refused(cli("train", tmp_path / "c.yaml"), "no space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c.yaml", "run"] if existing else ["c.yaml"])
    if existing:
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_hostile_paths_are_taken_literally(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    odd = tmp_path / "it's [a] \"run\" dir; DROP TABLE x"
    odd.mkdir()
    corpus = odd / "my corpus [v2].jsonl"
    shutil.copy(corpus_jsonl, corpus)
    out = odd / "run ['x'] *"
    assert cli("route", tiny_olmoe_dir, "--data", corpus, "--out", out, "--ctx-len", "16",
               "--domain-field", "domain").code == 0
    assert cli("stats", out, "--no-figures").code == 0
    summary = json.loads((out / "analyses" / "summary.json").read_text())
    assert summary["tokens"] == json.loads((out / "run.json").read_text())["tokens"] > 0


# ---- debug and interrupts -------------------------------------------------------------------------


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("--debug", "stats", tmp_path / "nothing")
    assert result.code == 2 and "Traceback" in result.err and len(result.error_lines) == 1


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C as a terminal delivers it: a test run started in the background (`pytest &`, nohup) has
    # SIGINT ignored, which its children inherit and Python then keeps (it never sees the signal)
    return subprocess.Popen([sys.executable, "-m", "deepseemoe.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _long_train_config(tiny_olmoe_dir, corpus_jsonl, tmp_path, tokens: int = 200_000) -> Path:
    corpus = tmp_path / "long.jsonl"
    corpus.write_text(corpus_jsonl.read_text() * 1000)
    config = _config(tiny_olmoe_dir, corpus, tmp_path / "run", tokens=tokens, checkpoint_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "c.yaml"


def test_ctrl_c_during_train_says_what_was_kept(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    proc = _start(["train", _long_train_config(tiny_olmoe_dir, corpus_jsonl, tmp_path)])
    _wait_for(proc, tmp_path / "run" / "checkpoint.safetensors")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert "checkpoint" in lines[0] and "--resume" in lines[0]


def test_kill_9_during_train_then_resume(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    config = _long_train_config(tiny_olmoe_dir, corpus_jsonl, tmp_path, tokens=20_000)
    proc = _start(["train", config])
    _wait_for(proc, tmp_path / "run" / "checkpoint.safetensors")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert logged < 20_000 // 64  # killed before the end
    assert cli("train", config, "--resume").code == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(20_000 // 64))  # each step once, none missing


def test_ctrl_c_during_route_keeps_the_old_run(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    corpus = tmp_path / "long.jsonl"
    corpus.write_text(corpus_jsonl.read_text() * 200)
    out = tmp_path / "run"
    proc = _start(["route", tiny_olmoe_dir, "--data", corpus, "--out", out, "--ctx-len", "16", "--batch-size", "2"])
    _wait_for(proc, tmp_path / ".run.staging")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert "nothing of the new run" in lines[0]
    assert not out.exists() and not (tmp_path / ".run.staging").exists()


def test_kill_9_before_the_first_checkpoint_restarts_cleanly(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    config = _long_train_config(tiny_olmoe_dir, corpus_jsonl, tmp_path, tokens=20_000)
    spec = yaml.safe_load(config.read_text())
    spec["checkpoint_every"] = 10_000  # no checkpoint before the kill
    config.write_text(yaml.safe_dump(spec))
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = _start(["train", config])
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert_refused(cli("train", config, "--resume"), "nothing to resume")
    assert cli("train", config).code == 0  # the same command starts it again
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(20_000 // 64))


def test_inspect_an_unknown_tiny_type(cli):
    assert_refused(cli("inspect", "tiny:nope"), "tiny:nope")


def test_evaluate_prints_plain_full_numbers_when_piped(cli, run_copy):
    result = cli("evaluate", run_copy, "--tokens", "64")  # captured output: not a terminal
    assert result.code == 0
    name = next((run_copy / "dictionaries").iterdir()).name
    (row,) = [line.split() for line in result.out.splitlines() if line.split()[:1] == [name]]
    fvu = json.loads((run_copy / "evaluation.json").read_text())["coders"][name]["fvu"]
    assert row[1] == f"{fvu:.3f}" and len(row) == 9 and "…" not in result.out


def test_loss_recovered_is_undefined_when_zero_ablation_does_nothing():
    from deepseemoe.dictionaries.evaluate import loss_recovered

    # 100 predictions whose CE rises by exactly 1 under zero ablation: a clear denominator
    assert loss_recovered(2.0, 2.1, 3.0, zero_diff_sq=100 * 1.0, n=100) == pytest.approx(0.9)  # 0.9 / 1.0
    # mean change −0.0016 from per-prediction changes of ±0.5: noise, so the −1.4 ratio is not reported
    assert loss_recovered(2.0, 2.1, 1.9984, zero_diff_sq=100 * 0.25, n=100) is None
    # a splice that is the zero ablation recovers nothing, noise or not
    assert loss_recovered(2.0, 1.9984, 1.9984, zero_diff_sq=100 * 0.25, n=100) == 0.0
    # the same small mean with no spread is a real (if small) effect
    assert loss_recovered(2.0, 2.0, 1.9984, zero_diff_sq=100 * 0.0016**2, n=100) == pytest.approx(1.0)


def test_run_verbs_take_a_device(cli, run_copy):
    name = next((run_copy / "dictionaries").iterdir()).name
    for verb in (["map", run_copy, "--dictionary", name], ["steer", run_copy, "--dictionary", name, "--feature", "0"],
                 ["latents", run_copy]):
        result = cli(*verb, "--device", "cpu", "--tokens", "64")
        assert result.code == 0, (verb, result.err[-500:])
    assert_refused(cli("map", run_copy, "--dictionary", name, "--device", "nope", "--tokens", "64"))
