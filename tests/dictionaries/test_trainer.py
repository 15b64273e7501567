"""Coder training: planted features are recovered, kill-and-resume is exact, live MoE sites train."""

from __future__ import annotations

import pytest
import torch

from deepseemoe.capture.core import Site
from deepseemoe.data.sources import TextSource, iter_documents
from deepseemoe.data.tokens import pack_documents
from deepseemoe.dictionaries.coder import CoderConfig, SparseCoder
from deepseemoe.dictionaries.stream import model_stream, tensor_stream
from deepseemoe.dictionaries.trainer import CoderTrainer, TrainConfig
from deepseemoe.models.load import load_model


def planted(n=80_000, d=32, f=64, active=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(f, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    idx = torch.rand(n, f, generator=g).topk(active, dim=1).indices
    coef = torch.zeros(n, f).scatter(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return coef @ features, features


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_planted_features_are_recovered(activation):
    x, features = planted()
    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=32, n_latents=128, activation=activation, k=3))
    trainer = CoderTrainer({"sae": coder}, TrainConfig(batch_size=256, buffer_size=4096, lr=3e-3,
                                                       dead_after_tokens=20_000))
    trainer.fit(tensor_stream(x, name="sae"), max_steps=250)
    # reference: cosine of each planted direction with its best-matching decoder row
    cos = torch.nn.functional.normalize(coder.W_dec.detach(), dim=1) @ features.T
    assert float(cos.max(0).values.mean()) >= 0.9
    assert trainer.metrics[-1]["fvu"] < 0.1


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_relu_and_jumprelu_reach_their_target_l0_by_default(activation):
    """Planted data with 6 active features of 128: by default the sparsity coefficient is steered
    toward L0 = k = 8 (ReLU with the coefficient fixed at 0 stays dense; JumpReLU also starts its
    thresholds at L0 ≈ k)."""
    x, _ = planted(n=60_000, f=128, active=6, seed=3)
    l0 = {}
    for coef in (None, 0.0):
        torch.manual_seed(0)
        coder = SparseCoder(CoderConfig(d_in=32, n_latents=128, activation=activation, k=8))
        trainer = CoderTrainer({"sae": coder}, TrainConfig(batch_size=256, buffer_size=1024, lr=3e-3,
                                                           sparsity_coef=coef))
        trainer.fit(tensor_stream(x.repeat(6, 1), name="sae"), max_steps=1400)
        last = trainer.metrics[-50:]
        l0[coef] = sum(m["l0"] for m in last) / len(last)
        fvu = sum(m["fvu"] for m in last) / len(last)
    assert 4 <= l0[None] <= 12, l0
    if activation == "relu":
        assert l0[0.0] > 3 * 8, l0
    assert fvu < 0.2  # the dense one reconstructs; the sparse one is checked by its L0


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, activation):
    x, _ = planted(n=8000)
    y = x @ torch.randn(32, 16, generator=torch.Generator().manual_seed(2))

    def fresh():
        torch.manual_seed(0)
        coder = SparseCoder(CoderConfig(d_in=32, d_out=16, n_latents=64, activation=activation, k=4))
        return CoderTrainer({"tc": coder}, TrainConfig(batch_size=128, buffer_size=1024, lr=1e-3,
                                                       dead_after_tokens=2000))

    straight = fresh()
    straight.fit(tensor_stream(x, y, name="tc", chunk=300), max_steps=40)
    first = fresh()
    first.fit(tensor_stream(x, y, name="tc", chunk=300), max_steps=17)
    first.save(tmp_path / "ckpt.safetensors")
    del first  # "killed"
    resumed = fresh()
    resumed.resume(tmp_path / "ckpt.safetensors")
    resumed.fit(tensor_stream(x, y, name="tc", chunk=300), max_steps=40)
    for a, b in zip(straight.coders["tc"].state_dict().values(), resumed.coders["tc"].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert straight.sparsity_coef("tc") == resumed.sparsity_coef("tc")


def test_moe_block_and_router_transcoders_train_from_a_live_model(tiny_olmoe_dir, corpus_jsonl):
    handle = load_model(str(tiny_olmoe_dir))
    D = handle.model.config.hidden_size
    E = handle.moe_layers[1].num_experts
    coders = {"block1": SparseCoder(CoderConfig(d_in=D, d_out=D, n_latents=128, k=8, skip=True)),
              "router1": SparseCoder(CoderConfig(d_in=D, d_out=E, n_latents=64, k=4)),
              "resid0": SparseCoder(CoderConfig(d_in=D, n_latents=128, k=8, activation="relu"))}
    pairs = {"block1": (Site("block_in", 1), Site("block_out", 1)),
             "router1": (Site("block_in", 1), Site("router_logits", 1)),
             "resid0": (Site("resid_out", 0), Site("resid_out", 0))}

    def stream():
        docs = [d for _ in range(30) for d in iter_documents(TextSource(str(corpus_jsonl)))]
        return model_stream(handle, pack_documents(handle.tokenizer, docs, ctx_len=32, batch_size=8), pairs)

    trainer = CoderTrainer(coders, TrainConfig(batch_size=128, buffer_size=512, lr=3e-3, sparsity_coef=1e-3))
    trainer.fit(stream(), max_steps=30)
    by = {}
    for m in trainer.metrics:
        by.setdefault(m["coder"], []).append(m["fvu"])
    for name, curve in by.items():
        assert len(curve) == 30 and curve[-1] < curve[0], name


def test_shuffle_buffer_hands_out_every_row_exactly_once():
    from deepseemoe.dictionaries.trainer import _Buffer

    buf, g = _Buffer(64, "cpu"), torch.Generator().manual_seed(0)
    added, taken = [], []
    for i in range(20):  # interleave adds and takes of different sizes
        rows = torch.arange(i * 13, (i + 1) * 13, dtype=torch.float32)[:, None].repeat(1, 3)
        buf.add(rows)
        added.append(rows)
        if buf.fill >= 20:
            taken.append(buf.take(11, g))
    while buf.fill:
        taken.append(buf.take(min(5, buf.fill), g))
    assert sorted(torch.cat(taken)[:, 0].tolist()) == sorted(torch.cat(added)[:, 0].tolist())


@pytest.mark.parametrize(("activation", "d_out", "skip"), [("topk", None, False), ("batchtopk", 16, True),
                                                           ("relu", None, False), ("jumprelu", 16, False)])
def test_training_starts_no_worse_than_the_mean(activation, d_out, skip):
    """Data with a large mean offset: the first step's FVU (measured before any update) is at most 1,
    because b_dec starts at the mean target and the encoder at the least-squares scale. The
    decoder-transpose init alone over-reconstructed (FVU 4–10 at k/D = 1/4)."""
    g = torch.Generator().manual_seed(4)
    x = planted(n=4096, d=32, f=64, active=6, seed=4)[0] * 2 + torch.randn(32, generator=g) * 3
    y = x @ torch.randn(32, 16, generator=g) if d_out else x
    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=32, d_out=d_out, n_latents=128, activation=activation, k=8, skip=skip))
    trainer = CoderTrainer({"c": coder}, TrainConfig(batch_size=1024, buffer_size=2048))
    trainer.fit(tensor_stream(x, y, name="c") if d_out else tensor_stream(x, name="c"), max_steps=1)
    assert trainer.metrics[0]["fvu"] <= 1.0, trainer.metrics[0]
