"""load_model from local folders: round trip, device_map + bf16, and its one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, T5Config, T5Model

from deepseemoe.capture.consumers import RoutingRecorder
from deepseemoe.capture.core import run_capture
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.load import load_model
from deepseemoe.models.tiny import tiny_model


def test_local_folder_round_trip(tiny_olmoe_dir):
    handle = load_model(str(tiny_olmoe_dir))
    ref = AutoModelForCausalLM.from_pretrained(tiny_olmoe_dir).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(handle.model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert handle.is_moe and handle.model_type == "olmoe" and handle.tokenizer is not None
    assert {m.router_family for m in handle.moe_layers.values()} == {"softmax_topk"}


def test_device_map_and_bf16(tiny_olmoe_dir):
    handle = load_model(str(tiny_olmoe_dir), device_map="cpu", dtype="bf16")
    assert next(handle.model.parameters()).dtype == torch.bfloat16
    rec = RoutingRecorder(sorted(handle.moe_layers))
    run_capture(handle, torch.tensor([[1, 5, 9, 13, 20]]), [rec])
    assert rec.batches[0]["idx"][0].shape == (4, 2)


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(DeepSeeMoEError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100)).save_pretrained(
        tmp_path / "t5")
    with pytest.raises(DeepSeeMoEError, match="not a causal language model"):
        load_model(str(tmp_path / "t5"))
    with pytest.raises(DeepSeeMoEError, match="unknown dtype"):
        load_model(str(tmp_path / "t5"), dtype="int3")
    tiny_model("jetmoe").save_pretrained(tmp_path / "jetmoe")
    with pytest.raises(DeepSeeMoEError, match=r"unsupported MoE architecture JetMoeMoE.*MoEAdapter"):
        load_model(str(tmp_path / "jetmoe"))


def test_a_model_without_moe_layers_is_dense(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path / "qwen3")
    handle = load_model(str(tmp_path / "qwen3"))
    assert not handle.is_moe and len(handle.dense_mlps) == handle.num_layers


def test_tiny_scheme_builds_a_random_model_of_that_type():
    import torch
    from typer.testing import CliRunner

    from deepseemoe.cli import app
    from deepseemoe.models.load import load_model
    from deepseemoe.models.tiny import tiny_config

    handle = load_model("tiny:olmoe", dtype="bfloat16")
    assert handle.is_moe and handle.num_layers == tiny_config("olmoe").num_hidden_layers
    assert next(handle.model.parameters()).dtype == torch.bfloat16 and handle.name == "tiny:olmoe"
    result = CliRunner().invoke(app, ["inspect", "tiny:mixtral"])
    assert result.exit_code == 0 and "MoE" in result.output


def test_tiny_models_read_text_through_every_verb_the_help_offers_them_to(tmp_path, cli):
    """`tiny:` models come with a byte-level tokenizer: any text round-trips, and train / route run."""
    import json

    from deepseemoe.models.load import load_model

    tok = load_model("tiny:olmoe").tokenizer
    for text in ("plain ascii", "también café", "привет мир", "日本語のテキスト", "emoji 🙂🚀"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and len(ids) == len(text.encode())  # one token per byte
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: también привет 🙂"}) + "\n" for i in range(60)))
    r = cli("train", "--model", "tiny:olmoe", "--data", str(data), "--kind", "sae", "--layers", "1",
            "--out", str(tmp_path / "dicts"), "--tokens", "1024")
    assert r.code == 0, r.err
    r = cli("route", "tiny:mixtral", "--data", str(data), "--out", str(tmp_path / "route"), "--max-tokens", "500")
    assert r.code == 0, r.err


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss",
                                        "flex_olmo", "glm4_moe", "ernie4_5_moe", "granitemoe"])
def test_structure_without_weights_equals_the_loaded_models(model_type, tmp_path):
    """`inspect` builds the model on the meta device (no weights read); its MoE table must be the one
    of the model loaded with its weights. The router family is detected afresh on each side."""
    from deepseemoe.models import routers
    from deepseemoe.models.load import load_model
    from deepseemoe.models.tiny import tiny_model

    tiny_model(model_type).save_pretrained(tmp_path / "m")

    def table(weights):
        routers._detected.clear()
        h = load_model(str(tmp_path / "m"), load_tokenizer=False, weights=weights)
        return [(i, m.num_experts, m.top_k, m.router_family, m.combine, m.shared_paths, m.block_path)
                for i, m in sorted(h.moe_layers.items())], sorted(h.dense_mlps)

    assert table(weights=False) == table(weights=True)


def test_inspect_reads_no_weights(tiny_olmoe_dir, tmp_path, cli):
    import shutil

    whole = cli("inspect", tiny_olmoe_dir)
    broken = tmp_path / "m"
    shutil.copytree(tiny_olmoe_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # would fail any load of the weights
    result = cli("inspect", broken)
    assert whole.code == result.code == 0
    def rows(out):  # the table itself (the title wraps with the path's length)
        return [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]

    assert rows(result.out) == rows(whole.out) and len(rows(whole.out)) == 6


def test_mla_model_with_fewer_kv_heads_than_heads_routes_padded_batches(tmp_path, cli, corpus_jsonl):
    """A DeepSeek-V3 config with num_key_value_heads < num_attention_heads made transformers repeat
    MLA's per-head keys ("size of tensor a (4) must match … (8)") on every padded batch. Loaded,
    the model computes what its weights define: the same logits as with as many KV heads as heads."""
    import copy

    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from deepseemoe.models.load import load_model
    from tests.conftest import build_tokenizer

    tok = build_tokenizer(tmp_path / "m")
    config = DeepseekV3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "m")
    r = cli("route", tmp_path / "m", "--data", corpus_jsonl, "--out", tmp_path / "r", "--max-tokens", "400",
            "--ctx-len", "24", "--batch-size", "4")
    assert r.code == 0, r.err
    handle = load_model(str(tmp_path / "m"))
    reference_config = copy.deepcopy(config)
    reference_config.num_key_value_heads = 4
    reference = DeepseekV3ForCausalLM(reference_config)
    reference.load_state_dict(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m").state_dict())
    ids = torch.randint(3, len(tok), (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = handle.model(input_ids=ids, attention_mask=mask).logits
        want = reference.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], want[mask.bool()])


def test_inspect_answers_from_its_cache_without_importing_torch(tiny_olmoe_dir, tmp_path, cli, monkeypatch):
    """The second `inspect` of a folder reads the structure the first one found (keyed by the config's
    sha256 and the versions) and imports neither torch nor transformers; a changed config or a damaged
    cache entry is computed again."""
    import json
    import shutil
    import subprocess
    import sys

    monkeypatch.setenv("DEEPSEEMOE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    shutil.copytree(tiny_olmoe_dir, folder)

    def rows(out):
        return [line for line in out.splitlines() if line[:1] in "┃│"]

    first = cli("inspect", folder)
    assert first.code == 0 and len(list((tmp_path / "cache" / "structure").glob("*.json"))) == 1
    probe = ("import sys\nfrom deepseemoe.cli import run\nsys.argv = ['deepseemoe', 'inspect', sys.argv[1]]\n"
             "try:\n    run()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
             "print('imported:', sorted({'torch', 'transformers'} & set(sys.modules)))\n")
    env = {**__import__("os").environ, "DEEPSEEMOE_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "imported: []" in out and rows(out) == rows(first.out)

    config = json.loads((folder / "config.json").read_text())
    config["num_experts_per_tok"] = 3  # another model: its top-k is read again
    (folder / "config.json").write_text(json.dumps(config))
    changed = cli("inspect", folder)
    assert changed.code == 0
    assert [r.split("│")[4].strip() for r in rows(changed.out)[1:]] == ["3"] * (len(rows(changed.out)) - 1)
    for entry in (tmp_path / "cache" / "structure").glob("*.json"):
        entry.write_text('{"key": "x", "structure": {"rows": 5}}')  # damaged: never trusted
    again = cli("inspect", folder)
    assert again.code == 0 and rows(again.out) == rows(changed.out)


def test_faster_cpu_dtype_follows_the_measured_clock():
    """bf16 only where its products are measured at least 1.5x faster than float32's."""
    import torch

    from deepseemoe.models.load import faster_cpu_dtype

    def clock(bf16: float, fp32: float):
        return lambda dtype: bf16 if dtype == torch.bfloat16 else fp32

    assert faster_cpu_dtype(timer=clock(0.10, 0.30)) == "bfloat16"
    assert faster_cpu_dtype(timer=clock(0.25, 0.375)) == "bfloat16"  # exactly 1.5x
    assert faster_cpu_dtype(timer=clock(0.30, 0.375)) == "float32"
    assert faster_cpu_dtype(timer=clock(0.90, 0.30)) == "float32"  # emulated bf16
    assert faster_cpu_dtype() in ("bfloat16", "float32")  # this machine, measured
