"""Benchmark: routing capture of every MoE layer vs a bare forward of the same model.

    python bench/capture_overhead.py [--model-type olmoe] [--layers 8] [--reps 10]

A random-weight model of the demo's shape family (hidden 256, 16 experts, top-2) is timed
with the same inputs, alternating bare and captured forwards so both see the same machine
state. Prints tokens/s of each and the ratio (goal: capture ≥ 0.95 × bare).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepseemoe.capture.consumers import RoutingRecorder
from deepseemoe.capture.core import run_capture
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.tiny import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="olmoe")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = tiny_model(args.model_type, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                       num_hidden_layers=args.layers, num_experts=16, num_local_experts=16, vocab_size=4096,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=64).to(args.device)
    handle = handle_from_model(model)
    ids = torch.randint(3, 4000, (args.batch, args.seq), device=args.device)
    recorder = RoutingRecorder(sorted(handle.moe_layers))

    def bare():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def captured():
        run_capture(handle, ids, [recorder], exclude_bos=False)
        recorder.clear()

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in (bare, captured):  # warm-up
        fn()
    t_bare, t_cap = [], []
    for _ in range(args.reps):
        t_bare.append(timed(bare))
        t_cap.append(timed(captured))
    tokens = ids.numel()
    b, c = statistics.median(t_bare), statistics.median(t_cap)
    print(f"{args.model_type} {args.layers} MoE layers, {tokens} tokens/forward on {args.device} "
          f"({torch.get_num_threads()} threads), median of {args.reps}")
    print(f"bare forward   {tokens / b:10,.0f} tok/s  ({b * 1e3:.1f} ms)")
    print(f"routing capture {tokens / c:9,.0f} tok/s  ({c * 1e3:.1f} ms)")
    print(f"ratio capture/bare throughput: {b / c:.3f}")


if __name__ == "__main__":
    main()
