"""Which reach, measured on a planted answer (issue: which layers, how many neighbours). Activations
of 3 layers: 6 *shared* features read at layer 0 write to layers 0, 1 and 2; 6 *local* features per
layer are read and written at their own layer. A CLT trained on them recovers the planted spread (the
shared features write to 3 layers, the local ones to 1), and at the same latents and L0 the per-layer
transcoders (reach 0) cannot reconstruct what layer 0's features write to layers 1 and 2: their FVU
is measured higher, not assumed."""

from __future__ import annotations

import torch

S, D, SHARED, LOCAL = 3, 16, 6, 6


def planted(n: int = 60_000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        v = torch.randn(*shape, D, generator=g)
        return v / v.norm(dim=-1, keepdim=True)

    read_shared, write_shared = unit(SHARED), unit(SHARED, S)  # read at layer 0; a vector for each layer
    read_local, write_local = unit(S, LOCAL), unit(S, LOCAL)
    x, y = torch.zeros(n, S, D), torch.zeros(n, S, D)
    a = (torch.rand(n, SHARED, generator=g) < 0.08) * (0.5 + torch.rand(n, SHARED, generator=g))
    x[:, 0] += a @ read_shared
    for j in range(S):
        y[:, j] += a @ write_shared[:, j]
    for layer in range(S):
        b = (torch.rand(n, LOCAL, generator=g) < 0.08) * (0.5 + torch.rand(n, LOCAL, generator=g))
        x[:, layer] += b @ read_local[layer]
        y[:, layer] += b @ write_local[layer]
    return x.reshape(n, S * D), y.reshape(n, S * D)


def _train(neighbours, x, y, latents_per_layer=12, k=4, epochs=3):
    import itertools

    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.stream import tensor_stream
    from deepseemoe.dictionaries.trainer import CoderTrainer, TrainConfig

    torch.manual_seed(0)
    clt = build_coder(CoderConfig(d_in=S * D, d_out=S * D, n_latents=S * latents_per_layer, n_sites=S,
                                  cross_layer=True, activation="topk", k=k, neighbours=neighbours))
    trainer = CoderTrainer({"clt": clt}, TrainConfig(batch_size=512, buffer_size=8192, lr=1e-2,
                                                     dead_after_tokens=20_000))
    stream = itertools.chain.from_iterable(tensor_stream(x, y, name="clt") for _ in range(epochs))
    trainer.fit(stream, max_steps=10_000)  # the epochs end it
    return clt.eval()


@torch.no_grad()
def _fvu_and_live(clt, x, y):
    out = clt(x)
    fvu = float((y - out.out).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return fvu, (out.latents > 0).any(0).numpy()


def test_the_clt_recovers_the_planted_spread_and_reach_zero_reconstructs_worse():
    from deepseemoe.dictionaries.spread import layer_spread

    x, y = planted()
    train, held = slice(0, -8_000), slice(-8_000, None)  # the last 8,000 tokens held out
    clt = _train(None, x[train], y[train])
    fvu_all, live = _fvu_and_live(clt, x[held], y[held])
    spread = layer_spread(clt, live)
    # one layer-0 latent per shared feature, writing to all three layers; the local features (and the odd
    # split of one) write to their own layer only
    assert fvu_all < 0.05
    assert spread["histogram"]["3"] == SHARED and spread["histogram"]["2"] == 0
    assert spread["histogram"]["1"] >= S * LOCAL
    assert spread["share_by_offset"][1] > 0.05 and spread["share_by_offset"][2] > 0.05
    per_layer = _train(0, x[train], y[train])
    fvu_0, live0 = _fvu_and_live(per_layer, x[held], y[held])
    assert layer_spread(per_layer, live0)["histogram"]["1"] == int(live0.sum())
    # layers 1 and 2 hold the shared features' writes, which their own inputs do not carry: about a third of y
    assert fvu_0 > fvu_all + 0.2, (fvu_0, fvu_all)
