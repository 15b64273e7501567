"""`deepseemoe ablate --target`: removing a behaviour, on a hand-built model with a planted answer.

The model (`planted.planted_model`): attention writes nothing, so each prediction is a function of
the token read alone; `a` tokens (ids 10–19) are the only ones routed to expert 0, in both
layers, and expert 0's output is scaled up so that it decides what follows an `a` token. The
text pairs each a_i with the token the clean model predicts after it (s_i). Removing expert 0
must hit the predictions read from `a` tokens — by exactly the ΔCE a plain Hugging Face forward
gives with expert 0's weights zeroed — and leave every other prediction exactly as it was.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tests.causal.planted import planted_model

A_IDS = list(range(10, 20))
WORDS = {0: "<pad>", 1: "<s>", 2: "</s>", **{i: f"w{i}" for i in range(3, 10)},
         **{10 + i: f"a{i}" for i in range(10)}, **{20 + i: f"b{i}" for i in range(10)}, 30: "c0", 31: "c1"}


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in WORDS.items()}, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _ce(model, read: int, nxt: int) -> float:
    """Cross-entropy of `nxt` after `read` by a plain forward (the prediction depends on `read` alone)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, read]])).logits[0, -1].float()
    return float(-torch.log_softmax(logits, -1)[nxt])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(model folder, corpus, expected target ΔCE of zeroing expert 0 in every layer)."""
    model = planted_model().model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[0] *= 20.0
        model.lm_head.weight *= 50.0  # confident predictions, so that what decides them matters
        succ = {}
        for a in A_IDS:  # the clean model's favourite word after a (no special token, no a token)
            logits = model(input_ids=torch.tensor([[1, a]])).logits[0, -1]
            logits[:3] = logits[10:20] = -float("inf")
            succ[a] = int(logits.argmax())
    clean = {a: _ce(model, a, s) for a, s in succ.items()}
    saved = [layer.mlp.experts.down_proj[0].clone() for layer in model.model.layers]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[0] = 0
    expected = sum(_ce(model, a, s) - clean[a] for a, s in succ.items()) / len(succ)
    with torch.no_grad():
        for layer, w in zip(model.model.layers, saved, strict=True):
            layer.mlp.experts.down_proj[0] = w
    folder = tmp_path_factory.mktemp("planted_removal")
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    # 20 words + BOS = one context of 21 tokens per document, so no document is split
    a_doc = " ".join(f"{WORDS[a]} {WORDS[s]}" for a, s in succ.items())
    b_doc = " ".join(WORDS[20 + i % 10] for i in range(20))
    corpus = folder / "docs.jsonl"
    with open(corpus, "w") as f:
        for _ in range(4):  # a a b b: the alternate-context halves both get each domain
            for text, domain in [(a_doc, "a"), (a_doc, "a"), (b_doc, "b"), (b_doc, "b")]:
                f.write(json.dumps({"text": text, "domain": domain}) + "\n")
    return folder, corpus, expected


def test_removing_the_family_expert_hits_the_family_and_nothing_else(planted, cli, tmp_path):
    folder, corpus, expected = planted
    assert expected > 0.5  # the construction: expert 0 carries what follows an a token
    tokens = ",".join(f"a{i}" for i in range(10))
    r = cli("ablate", folder, "--data", corpus, "--out", tmp_path, "--target", f"tokens:{tokens}",
            "--units", "2", "--kinds", "expert,expert_neuron", "--ctx-len", "21", "--batch-size", "4",
            "--draws", "3")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "removal.json").read_text())
    assert result["target"]["token_ids"] == A_IDS
    experts = result["models"]["moe"]["kinds"]["expert"]
    assert {(c["layer"], c["unit"]) for c in experts["chosen"]} == {(0, 0), (1, 0)}
    assert experts["selected"]["target"] == pytest.approx(expected, rel=1e-4)
    assert abs(experts["selected"]["off_target"]) < 1e-6
    # a blind choice of 2 experts changes other predictions, and hurts the family less
    assert abs(experts["random"]["off_target"]) > 1e-4
    assert experts["random"]["target"] < experts["selected"]["target"]
    neurons = result["models"]["moe"]["kinds"]["expert_neuron"]
    width = neurons["of"] // 8  # 2 layers × 4 experts
    assert all(c["unit"] // width == 0 for c in neurons["chosen"])  # neurons of expert 0
    assert abs(neurons["selected"]["off_target"]) < 1e-6
    assert (tmp_path / "removal.png").stat().st_size > 0


def test_layers_limit_the_removal_to_their_units(planted, cli, tmp_path):
    """`--layers 1`: only layer 1's units may go. The planted family's expert there is chosen, and its
    target ΔCE is what a plain forward gives with layer 1's expert 0 zeroed alone (layer 0's still
    working) — less than removing both; no other prediction moves."""
    from transformers import AutoModelForCausalLM

    folder, corpus, both = planted
    model = AutoModelForCausalLM.from_pretrained(folder)
    pairs = [line for line in corpus.read_text().splitlines() if '"domain": "a"' in line][:1]
    words = json.loads(pairs[0])["text"].split()
    ids = {w: i for i, w in WORDS.items()}
    succ = {ids[a]: ids[s] for a, s in zip(words[::2], words[1::2], strict=True)}
    clean = {a: _ce(model, a, s) for a, s in succ.items()}
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[0] = 0
    expected = sum(_ce(model, a, s) - clean[a] for a, s in succ.items()) / len(succ)
    assert 0.05 < expected < both - 0.05  # layer 0's expert 0 still carries part of it

    tokens = ",".join(f"a{i}" for i in range(10))
    r = cli("ablate", folder, "--data", corpus, "--out", tmp_path, "--target", f"tokens:{tokens}", "--layers", "1",
            "--units", "1", "--kinds", "expert,expert_neuron", "--ctx-len", "21", "--batch-size", "4", "--draws", "2")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "removal.json").read_text())
    assert result["layers"] == [1]
    kinds = result["models"]["moe"]["kinds"]
    assert [(c["layer"], c["unit"]) for c in kinds["expert"]["chosen"]] == [(1, 0)]
    assert kinds["expert"]["of"] == 4  # the 4 experts of layer 1, not the 8 of both layers
    assert kinds["expert"]["selected"]["target"] == pytest.approx(expected, rel=1e-4)
    assert abs(kinds["expert"]["selected"]["off_target"]) < 1e-6
    assert {c["layer"] for c in kinds["expert_neuron"]["chosen"]} == {1}
    assert "layers 1 only" in r.out


def test_a_domain_target_and_zeroing_every_neuron_of_an_expert_equals_ablating_it(planted):
    """Two independent ways to remove expert 0: its routing weight set to 0, or every one of its
    neurons' down-projection weights zeroed. They must agree to the last digit that matters."""
    from deepseemoe.causal.checks import LossMeter
    from deepseemoe.causal.removal import Target, unit_inventory
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model

    folder, corpus, _ = planted
    handle = load_model(str(folder))
    batches = list(pack_documents(handle.tokenizer, iter_documents(TextSource(str(corpus), domain_field="domain")), ctx_len=21,
                                  batch_size=4))
    target = Target.parse("domain:a", handle.tokenizer)
    meter = LossMeter(handle, batches, [target.labels(b) for b in batches])
    inv = unit_inventory(handle, ("expert", "expert_neuron"))
    by_weight = meter.measure(lambda: inv["expert"].ablate([(0, 0), (1, 0)]))["by_domain"]
    width = len(inv["expert_neuron"].pairs) // 8
    every = [(la, u) for la in (0, 1) for u in range(width)]
    by_neurons = meter.measure(lambda: inv["expert_neuron"].ablate(every))["by_domain"]
    assert by_weight["target"] > 0.5
    assert by_neurons["target"] == pytest.approx(by_weight["target"], rel=1e-5)
    assert by_weight["off_target"] == 0 and by_neurons["off_target"] == 0
    # and the weights are back
    assert meter.measure()["delta_ce"] == 0


def test_target_errors(planted, cli, tmp_path):
    folder, corpus, _ = planted
    for args, words in [(["--target", "domain:nope"], "no token"),
                        (["--target", "a", "--experts", "0"], "--experts"),
                        (["--target", "a", "--layers", "7", "--kinds", "expert"], "in layers 7"),
                        (["--target", "a", "--layers", "one"], "--layers 'one'"),
                        (["--twin", str(folder)], "--target"),
                        (["--target", "ids:999"], "outside the vocabulary"),
                        (["--target", "a", "--kinds", "experts"], "--kinds"),
                        (["--target", "tokens:"], "names nothing"),
                        (["--target", "words:a0"], "unknown kind 'words'"),
                        (["--target", "a", "--budget", "2"], "--budget")]:
        r = cli("ablate", folder, "--data", corpus, "--out", tmp_path / "x", "--ctx-len", "21", *args)
        assert r.code == 2, (args, r.err)
        assert len(r.error_lines) == 1 and words in r.error_lines[0], (args, r.err)
    assert not (tmp_path / "x").exists()


def _hand_sae(D: int):
    """Feature 0 reads and writes residual dim 0 (the `a` marker, > 0 only on `a` tokens); feature 1 the
    opposite sign."""
    from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder

    coder = SparseCoder(CoderConfig(d_in=D, n_latents=2, k=1))
    with torch.no_grad():
        coder.W_enc.zero_()
        coder.W_dec.zero_()
        coder.W_enc[0, 0], coder.W_dec[0, 0] = 1.0, 1.0
        coder.W_enc[0, 1], coder.W_dec[1, 0] = -1.0, -1.0
    return coder


def _cut_marker(mod, args, kwargs):
    """A plain pre-hook: dim 0 of the MoE input zeroed where it is positive (what removing feature 0 does)."""
    h = (args[0] if args else kwargs["hidden_states"]).clone()
    h[..., 0] = torch.where(h[..., 0] > 0, torch.zeros_like(h[..., 0]), h[..., 0])
    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def _reference_target_dce(handle, batches, edit) -> float:
    """Target ΔCE of `edit` (a context manager factory) on the evaluation half, measured plainly."""
    from deepseemoe.causal.checks import LossMeter
    from deepseemoe.causal.removal import Target
    from deepseemoe.compare.selectivity import split_halves

    _, evaluate = split_halves(batches)
    target = Target.parse("tokens:" + ",".join(f"a{i}" for i in range(10)), handle.tokenizer)
    meter = LossMeter(handle, evaluate, [target.labels(b) for b in evaluate])
    return meter.measure(edit)["by_domain"]["target"]


def _planted_handle_and_batches(planted):
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model

    folder, corpus, _ = planted
    handle = load_model(str(folder))
    batches = list(pack_documents(handle.tokenizer, iter_documents(TextSource(str(corpus), domain_field="domain")),
                                  ctx_len=21, batch_size=4))
    return handle, batches


def test_feature_units_of_a_hand_built_sae(planted):
    """An SAE on layer 1's MoE input whose feature 0 reads and writes the residual dimension that marks
    `a` tokens: removing feature 0 (the SAE's error kept) zeroes that dimension on `a` tokens and
    nowhere else — the same as a hook doing just that in a plain forward."""
    from deepseemoe.capture.core import Site
    from deepseemoe.causal.removal import Dictionary, removal_study

    handle, batches = _planted_handle_and_batches(planted)
    site = Site("block_in", 1)
    result = removal_study([("moe", handle, batches)], "tokens:" + ",".join(f"a{i}" for i in range(10)), units=1,
                           kinds=("feature",), draws=0,
                           dictionary=Dictionary("hand", _hand_sae(handle.model.config.hidden_size), site))
    row = result["models"]["moe"]["kinds"]["feature"]
    assert [c["unit"] for c in row["chosen"]] == [0] and result["dictionary"] == "hand"
    assert row["selected"]["off_target"] == 0
    module = handle.site_module(site)

    @contextlib.contextmanager
    def hooked():
        h = module.register_forward_pre_hook(_cut_marker, with_kwargs=True)
        try:
            yield
        finally:
            h.remove()
    expected = _reference_target_dce(handle, batches, hooked)
    assert expected > 0.1
    assert row["selected"]["target"] == pytest.approx(expected, rel=1e-4)


def test_module_units_remove_their_features_and_experts_together(planted):
    """Two planted modules: {feature 0, expert 0} (the `a` family's) and {feature 1, expert 2}, the SAE on
    layer 0's MoE input and the experts of layer 1 (so each half of the removal has its own effect: the
    cut changes layer 0's routing only, layer 1 still sends `a` to expert 0). The family's module is
    the one chosen, and removing it equals, in a plain forward, the marker cut at layer 0's MoE input
    plus expert 0's weights zeroed in layer 1; nothing else moves."""
    from deepseemoe.capture.core import Site
    from deepseemoe.causal.removal import Dictionary, removal_study

    handle, batches = _planted_handle_and_batches(planted)
    site = Site("block_in", 0)
    d = Dictionary("hand", _hand_sae(handle.model.config.hidden_size), site, modules={0: ["f1", "E2"], 1: ["f0", "E0"]},
                   graph_layer=1)
    result = removal_study([("moe", handle, batches)], "tokens:" + ",".join(f"a{i}" for i in range(10)), units=1,
                           kinds=("module",), draws=1, dictionary=d)
    row = result["models"]["moe"]["kinds"]["module"]
    assert [c["unit"] for c in row["chosen"]] == [1]
    assert row["selected"]["off_target"] == 0
    experts = handle.model.model.layers[1].mlp.experts
    module = handle.site_module(site)

    @contextlib.contextmanager
    def both():
        saved = experts.down_proj[0].detach().clone()
        h = module.register_forward_pre_hook(_cut_marker, with_kwargs=True)
        with torch.no_grad():
            experts.down_proj[0] = 0
        try:
            yield
        finally:
            h.remove()
            with torch.no_grad():
                experts.down_proj[0] = saved
    expected = _reference_target_dce(handle, batches, both)
    assert row["selected"]["target"] == pytest.approx(expected, rel=1e-4)
    # and both halves count: neither alone gives it
    from deepseemoe.causal.removal import unit_inventory

    inv = unit_inventory(handle, ("feature", "expert"), d)
    alone = [_reference_target_dce(handle, batches, lambda: inv["feature"].ablate([(0, 0)])),
             _reference_target_dce(handle, batches, lambda: inv["expert"].ablate([(1, 0)]))]
    assert all(abs(a - expected) > 0.05 for a in alone), (alone, expected)
