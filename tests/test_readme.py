"""Every example in the README runs as written, on tiny local stand-ins.

The only changes are the ones this machine forces, listed in SUBSTITUTIONS: hub models and the
hub dataset become local tiny folders and files (no network), CUDA devices become the CPU, and
sizes shrink (tokens, context length, batch sizes) so the whole README runs in under a minute.
Names, flags, layers, kinds, activations, formats and file layouts are the README's own.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.explain.stub_server import Stub

README = Path(__file__).parent.parent / "README.md"

SUBSTITUTIONS = [  # (pattern, replacement); {moe}, {train}, … are filled in per test
    (r"\.venv/bin/deepseemoe", "deepseemoe"),
    (r"allenai/OLMoE-1B-7B-0924|allenai/OLMoE-1B-7B-0125|Qwen/Qwen3-30B-A3B", "{moe}"),
    # the placeholders of any model: a 2-layer pair, so ablating every expert stays quick
    (r"\bMOE_MODEL\b|\bMODEL\b", "{small_moe}"),
    (r"\bDENSE_MODEL\b", "{small_dense}"),
    (r"hf:mlfoundations/dclm-baseline-1\.0", "{train}"),
    (r"cuda:\d", "cpu"),
    (r"--max-tokens 2000000", "--max-tokens 3000"),
    (r"--ctx-len 1024", "--ctx-len 64"),
    # the explainer: an OpenAI-compatible oracle server on this machine (tests/explain/stub_server.py)
    # stands in for the remote endpoint and for the offline SmolLM2 (tests/explain/test_smollm2.py)
    (r"http://127\.0\.0\.1:8000/v1", "{llm}"),
    (r"(deepseemoe (?:explain|score) (?:(?!--backend|--find)[^\n])*?)$", r"\1 --backend openai --url {llm} --model oracle"),
    # carving: the 2-layer Llama stand-in instead of SmolLM2 (minutes on 2 cores), its layers, a corpus folder
    (r"(deepseemoe zoo carve [^\n]*?)$", r"\1 --model {small_dense} --calibration-tokens 600 --eval-tokens 300 "
                                           r"--ctx-len 64"),
    (r"--layers 10-19", "--layers 0-1"),
    (r"runs/demo/corpus", "{corpus_dir}"),
    # descriptions: 8 of the 40 features (every scorer still runs on each)
    (r"--features 40", "--features 8"),
    # post-training: one seed of two steps per strategy
    (r"(--out runs/post)$", r"\1 --steps 2 --seeds 1 --ctx-len 64 --train-tokens 1500 --eval-tokens 600"),
]
YAML_SIZES = {"tokens": 2048, "ctx_len": 64, "train": {"batch_size": 256, "buffer_size": 1024}}


def blocks(lang: str) -> list[str]:
    return [b for lg, b in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S) if lg == lang]


def substitute(text: str, **paths: str) -> str:
    for pattern, repl in SUBSTITUTIONS:
        for name, value in paths.items():
            repl = repl.replace("{" + name + "}", value.replace("\\", "\\\\"))
        text = re.sub(pattern, repl, text, flags=re.M)
    return text


def shell_commands(block: str) -> list[list[str]]:
    """The `deepseemoe …` commands of a bash block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines()
            if line.strip().startswith(("deepseemoe ", ".venv/bin/deepseemoe "))]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A 12-layer, 16-expert tiny OLMoE (the README's layers 3/7/11 and expert 12 exist), a 2-layer
    OLMoE / Llama pair, and text with domains: a training file, a held-out file and a zstd corpus."""
    import torch
    import zstandard
    from transformers import LlamaConfig, LlamaForCausalLM

    from deepseemoe.models.tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("readme")
    tok = tiny_tokenizer()
    moe = tiny_model("olmoe", num_hidden_layers=12, num_experts=16, vocab_size=len(tok))
    moe.save_pretrained(root / "moe")
    tok.save_pretrained(root / "moe")
    tiny_model("olmoe", vocab_size=len(tok)).save_pretrained(root / "small_moe")
    tok.save_pretrained(root / "small_moe")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(root / "small_dense")
    tok.save_pretrained(root / "small_dense")
    texts = {"code": "def f(x):\n    return x + {i}\n", "en": "The river {i} runs past the old mill.",
             "de": "Der Fluss {i} fließt an der alten Mühle vorbei.", "ru": "Река {i} течёт мимо мельницы."}

    def docs(n: int) -> str:
        return "".join(json.dumps({"text": t.format(i=i) * 3, "domain": d}) + "\n"
                       for i in range(n) for d, t in texts.items())
    (root / "train.jsonl").write_text(docs(60))
    (root / "heldout.jsonl").write_text(docs(12))
    (root / "demo_corpus").mkdir()  # what `deepseemoe corpus build` writes: train.jsonl and val.jsonl
    (root / "demo_corpus" / "train.jsonl").write_text(docs(60))
    (root / "demo_corpus" / "val.jsonl").write_text(docs(12))
    (root / "corpus").mkdir()
    for domain in ("en", "ru"):
        lines = "".join(json.dumps({"text": texts[domain].format(i=i)}) + "\n" for i in range(20))
        (root / "corpus" / f"{domain}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return root


def test_every_readme_example_runs_as_written(stand_ins, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(stand_ins)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
    monkeypatch.setenv("DEEPSEEMOE_CACHE", str(tmp_path / "cache"))
    paths = {"moe": str(stand_ins / "moe"), "small_moe": str(stand_ins / "small_moe"),
             "small_dense": str(stand_ins / "small_dense"), "train": "train.jsonl", "llm": "",
             "corpus_dir": str(stand_ins / "demo_corpus")}
    # what the examples assume exists already: an earlier checkpoint's routing run and a study folder
    for out in ("runs/olmoe-step5000-dclm", "runs/study/run"):
        assert cli("route", paths["moe"], "--data", "train.jsonl", "--max-tokens", "3000", "--ctx-len", "64",
                   "--out", out).code == 0
    assert cli("stats", "runs/study/run").code == 0

    # the YAML configs, as written but for the stand-ins and sizes: the run config, then the sweep's
    config, sweep = blocks("yaml")
    sweep_settings = yaml.safe_load(substitute(sweep, **paths))
    sweep_settings.update(tokens=1024, ctx_len=32, eval="heldout.jsonl", eval_tokens=400,
                          train={"batch_size": 256, "buffer_size": 512})
    sweep_settings["sweep"].update(layers=[4, 5, 6], latents_per_layer=64, k=4, neighbours=[0, 1, "all"], seeds=[0, 1])
    Path("sweep.yaml").write_text(yaml.safe_dump(sweep_settings))
    settings = yaml.safe_load(substitute(config, **paths))
    for key, value in YAML_SIZES.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    Path("readme.yaml").write_text(yaml.safe_dump(settings))
    r = cli("train", "readme.yaml")
    assert r.code == 0, r.err
    trained = sorted(p.name for p in Path(settings["out"], "dictionaries").iterdir())
    assert trained == sorted(["sae_7", "sae_block_in_7", "skip_transcoder_7", "router_transcoder_7",
                              "crosscoder_3_7_11", "clt_all", "sae_3"])
    # every --dictionary the README names is one of them
    named = set(re.findall(r"--dictionary (?:[\w/.-]+:)?(\w+)", README.read_text())) - {"NAME"}
    assert named and named <= set(trained), named

    # every shell example, in order
    ran = 0
    with Stub() as llm:
        paths["llm"] = llm.url
        for block in blocks("bash"):
            for argv in shell_commands(substitute(block, **paths)):
                r = cli(*argv[1:])
                assert r.code == 0, (argv, r.err[-2000:])
                ran += 1
    assert ran >= 15, ran

    # the Python example
    for code in blocks("python"):
        exec(compile(substitute(code, **paths), "README.md", "exec"), {})


def test_the_install_extras_are_the_ones_pyproject_declares():
    import tomllib

    declared = set(tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    documented = set(re.findall(r'pip install (?:-c \S+ )?-e "\.\[(\w+)\]"', README.read_text()))
    assert documented == declared, (documented, declared)
