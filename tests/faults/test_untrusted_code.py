"""Nothing runs that the user did not ask for: pickle payloads where the project loads checkpoints,
coders and models are refused without executing, and remote code runs only on --trust-remote-code.

Each payload, if executed, creates a marker file; the tests assert the marker never appears (the
independent evidence that nothing ran), besides the one-line refusal."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import yaml

from tests.faults.conftest import assert_refused


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls open(marker, "w"): the file appearing proves code ran
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    return pickle.dumps({"state": _Payload(marker)})


def test_pickled_checkpoint_under_the_checkpoint_name_is_refused_on_resume(cli, run_copy, tmp_path):
    marker = tmp_path / "ran"
    (run_copy / "checkpoint.safetensors").write_bytes(payload(marker))
    result = cli("train", run_copy / "config.yaml", "--out", run_copy, "--resume")
    assert_refused(result, "checkpoint")
    assert not marker.exists()


def test_old_pickled_checkpoint_is_never_loaded(cli, run_copy, tmp_path):
    marker = tmp_path / "ran"
    (run_copy / "checkpoint.safetensors").unlink()
    (run_copy / "checkpoint.pt").write_bytes(payload(marker))
    for extra in ([], ["--resume"]):
        result = cli("train", run_copy / "config.yaml", "--out", run_copy, *extra)
        assert_refused(result, "checkpoint.pt", "pickle")
        assert not marker.exists()


def test_pickled_coder_file_is_refused(cli, run_copy, tmp_path):
    marker = tmp_path / "ran"
    coder = next((run_copy / "dictionaries").iterdir()) / "coder.safetensors"
    coder.write_bytes(payload(marker))
    result = cli("evaluate", run_copy, "--tokens", 64)
    assert_refused(result, "coder.safetensors")
    assert not marker.exists()


def test_pickled_model_weights_are_refused(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    marker = tmp_path / "ran"
    model = tmp_path / "model"
    shutil.copytree(tiny_olmoe_dir, model)
    for f in model.glob("*.safetensors*"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(payload(marker))
    result = cli("ablate", model, "--data", corpus_jsonl, "--out", tmp_path / "out", "--tokens", 64)
    assert_refused(result, "weights")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _remote_code_model(tiny_olmoe_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny OLMoE re-labelled as a model type transformers does not know, whose auto_map points
    at a module in the folder; importing that module creates the marker."""
    shutil.copytree(tiny_olmoe_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_moe", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import OlmoeConfig, OlmoeForCausalLM\n"
        "class EvilConfig(OlmoeConfig):\n    model_type = 'evil_moe'\n"
        "class EvilModel(OlmoeForCausalLM):\n    config_class = EvilConfig\n")
    return folder


def test_remote_code_in_a_saved_config_is_refused_without_the_flag(cli, run_copy, tiny_olmoe_dir, tmp_path):
    marker = tmp_path / "ran"
    model = _remote_code_model(tiny_olmoe_dir, tmp_path / "evil_model", marker)
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config.update(model=str(model), trust_remote_code=True)
    from deepseemoe.runs.dictionary import DictionaryRun

    DictionaryRun(run_copy).save_config(config)  # whole and checksummed: only the request is refused
    name = next((run_copy / "dictionaries").iterdir()).name
    for verb in (["evaluate", run_copy], ["map", run_copy, "--dictionary", name], ["latents", run_copy],
                 ["steer", run_copy, "--dictionary", name, "--feature", "0"]):
        result = cli(*verb, "--tokens", 64)
        assert_refused(result, "--trust-remote-code")
        assert not marker.exists(), verb


def test_remote_code_in_a_training_config_needs_the_flag(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    marker = tmp_path / "ran"
    model = _remote_code_model(tiny_olmoe_dir, tmp_path / "evil_model", marker)
    config = {"model": str(model), "corpus": str(corpus_jsonl), "out": str(tmp_path / "run"), "tokens": 256,
              "trust_remote_code": True, "coders": [{"kind": "sae", "layers": [0], "k": 4}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = cli("train", tmp_path / "run.yaml")
    assert_refused(result, "--trust-remote-code")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_remote_code_runs_when_the_command_line_asks(cli, tiny_olmoe_dir, tmp_path):
    # the positive control: the same folder does run its code with the flag, so the tests above
    # would have seen it run
    marker = tmp_path / "ran"
    model = _remote_code_model(tiny_olmoe_dir, tmp_path / "evil_model", marker)
    result = cli("inspect", model, "--trust-remote-code")
    assert marker.exists(), result.err


def test_pickled_activation_cache_shard_is_refused(cli, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    marker = tmp_path / "ran"
    cache = tmp_path / "acts"
    config = {"model": str(tiny_olmoe_dir), "corpus": str(corpus_jsonl), "out": str(tmp_path / "run"),
              "tokens": 256, "ctx_len": 32, "activation_cache": str(cache),
              "coders": [{"kind": "sae", "layers": [0], "k": 4, "expansion_factor": 2}],
              "train": {"batch_size": 64, "buffer_size": 128}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli("train", tmp_path / "c.yaml").code == 0
    shard = next(cache.glob("shard_*.safetensors"))
    shard.write_bytes(payload(marker))
    config["out"] = str(tmp_path / "run2")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_refused(cli("train", tmp_path / "c.yaml"), shard.name)
    assert not marker.exists()
