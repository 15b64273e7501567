"""Benchmark: our TopK SAE trainer vs sparsify's SparseCoder on the same activations.

    python bench/train_vs_sparsify.py [--d 512] [--expansion 16] [--k 32] [--batch 4096] [--steps 20]
                                      [--sparsify-optimizer signum|adam]

Both train a TopK SAE of the same width, k and batch on the same tensors, in the same process,
device and thread count, for the same number of steps, with unit-norm decoders. sparsify is driven
the way its own `Trainer` drives an SAE with its defaults: b_dec set to the first batch's mean (its
encoder bias only for transcoders — an SAE's encode already subtracts b_dec), the optimizer its
config defaults to (`signum`: schedule-free SignSGD, momentum 0.95, lr 5e-3 / √(F / 2¹⁴); or
`adam` at 2e-4 / √(F / 2¹⁴)), forward → FVU → backward → remove the decoder-parallel gradient →
step → renormalise. Ours runs `CoderTrainer.fit` at its `TrainConfig` defaults but for the batch
(fused Adam at 1.6e-3 / √(F / 2¹⁴), AuxK on, its own shuffle buffer; on a CPU with native bf16 the
certified bf16 encoder of dictionaries/topk.py). Activations: planted sparse features
plus a mean offset and noise (a residual stream's shape), so FVU has a meaningful floor.

Prints tokens/s of each, the ratio, and both FVUs on the same held-out tokens.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def activations(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_feat, active = 4 * d, 24
    feats = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    offset = torch.randn(d, generator=g) * 2
    x = torch.empty(n, d)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        idx = torch.rand(m, n_feat, generator=g).topk(active, dim=1).indices
        coef = torch.rand(m, active, generator=g) * 2 + 0.2
        x[s:s + m] = torch.zeros(m, n_feat).scatter(1, idx, coef) @ feats + offset + \
            0.05 * torch.randn(m, d, generator=g)
    return x


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def run_sparsify(x, held, args, device):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(args.d, SparseCoderConfig(expansion_factor=args.expansion, k=args.k), device=device)
    if args.sparsify_optimizer == "signum":  # sparsify's default (its Trainer, `case "signum"`)
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(),
                                            "lr": 5e-3 / math.sqrt(sae.num_latents / 2**14)}]), momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(sae.num_latents / 2**14))
    batches = x.split(args.batch)
    with torch.no_grad():  # what sparsify's Trainer does on its first step for an SAE: b_dec only
        sae.b_dec.data = batches[0].mean(0).to(device)

    def step(b):
        sae.set_decoder_norm_to_unit_norm()
        out = sae(b)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    step(batches[0].to(device))  # warm-up, not timed
    _sync(device)
    start = time.perf_counter()
    for b in batches[1:]:
        step(b.to(device))
    _sync(device)
    seconds = time.perf_counter() - start
    if hasattr(opt, "eval"):  # schedule-free: evaluate at the averaged weights, as its Trainer saves them
        opt.eval()
    with torch.no_grad():
        sae.set_decoder_norm_to_unit_norm()
        return (len(batches) - 1) * args.batch / seconds, fvu(held, sae(held.to(device)).sae_out.cpu())


def run_ours(x, held, args, device):
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.stream import tensor_stream
    from deepseemoe.dictionaries.trainer import CoderTrainer, TrainConfig

    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=args.d, expansion_factor=args.expansion, k=args.k), device=device)
    trainer = CoderTrainer({"sae": coder}, TrainConfig(batch_size=args.batch, device=str(device)))
    trainer.fit(tensor_stream(x, name="sae", chunk=args.batch), max_steps=1)  # warm-up, not timed
    _sync(device)
    start = time.perf_counter()  # a fresh stream: fit skips the items already consumed
    trainer.fit(tensor_stream(x, name="sae", chunk=args.batch), max_steps=len(x) // args.batch)
    _sync(device)
    seconds = time.perf_counter() - start
    coder.eval()
    with torch.no_grad():
        return (trainer.step - 1) * args.batch / seconds, fvu(held, coder(held.to(device)).out.cpu())


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum")
    args = ap.parse_args()
    n = (args.steps + 1) * args.batch
    data = activations(n + 8192, args.d)  # one distribution; the last 8192 tokens are held out
    x, held = data[:n], data[n:]
    print(f"TopK SAE d={args.d} F={args.d * args.expansion} k={args.k} batch={args.batch} steps={args.steps} "
          f"on {args.device} ({torch.get_num_threads()} threads); sparsify with {args.sparsify_optimizer}")
    theirs_tps, theirs_fvu = run_sparsify(x, held, args, args.device)
    ours_tps, ours_fvu = run_ours(x, held, args, args.device)
    print(f"sparsify : {theirs_tps:10,.0f} tok/s   held-out FVU {theirs_fvu:.4f}")
    print(f"deepseemoe: {ours_tps:10,.0f} tok/s   held-out FVU {ours_fvu:.4f}")
    print(f"ratio (ours / sparsify): {ours_tps / theirs_tps:.2f}x")


if __name__ == "__main__":
    main()
