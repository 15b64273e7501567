"""Benchmark: capture and `route` at the real models' dimensions (random weights, real config values).

    python bench/real_dimensions.py                                  # every model, 1 layer (2 for V2-Lite), CPU
    python bench/real_dimensions.py --models olmoe-1b-7b --layers 4 --route
    python bench/real_dimensions.py --device cuda --layers full --route --procs 1   # a GPU: whole models

For each model the configuration below is its checkpoint's `config.json` (the sizes that matter for
capture: hidden size, experts, top-k, expert width, attention shape, vocabulary), with as many
decoder layers as `--layers` asks (at least the first MoE layer), random weights in `--dtype`
(bfloat16 by default). Measured in one process, on the same batch, alternating so both see the same
machine state:
- bare forward: `model(input_ids)` with no hooks;
- routing capture as `route` runs it (every MoE layer's top-k and weights; the forward stops after
  the last MoE layer, so the head's cost is saved) and without stopping early (the hooks' own cost);
- routing + block inputs, what dictionary training captures (`block_in` of every MoE layer);
each as tokens/s and as a ratio to the bare forward (≥ 1: capture is not slower).
With `--route`: the model is saved with a small tokenizer, and `deepseemoe route` runs on synthetic
text with 1 and 2 processes (`--procs`; torchrun, gloo), printing tokens/s from the command itself
and the peak resident memory of its largest process (one rank). With `--writer`: the route
writer's peak memory for one 1M-token shard at the model's full routing shape (all its MoE layers,
bench/route_writer_memory.py). Prints the machine each figure came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# From each checkpoint's config.json (the hub, 2024–2025); num_hidden_layers is the full depth.
REAL = {
    "olmoe-1b-7b": ("olmoe", {  # allenai/OLMoE-1B-7B-0924
        "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}),
    "qwen3-30b-a3b": ("qwen3_moe", {  # Qwen/Qwen3-30B-A3B
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "vocab_size": 151936, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}),
    "gpt-oss-20b": ("gpt_oss", {  # openai/gpt-oss-20b (its MXFP4 experts as bf16 here)
        "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
        "vocab_size": 201088, "sliding_window": 128, "rope_theta": 150000.0, "swiglu_limit": 7.0,
        "attention_bias": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "tie_word_embeddings": False}),
    "deepseek-v2-lite": ("deepseek_v2", {  # deepseek-ai/DeepSeek-V2-Lite
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "norm_topk_prob": False, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}),
}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} ({platform.node()})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"CPU, {os.cpu_count()} cores, {mem:.0f} GiB ({torch.get_num_threads()} torch threads)"


def build(name: str, layers: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, values = REAL[name]
    full = values["num_hidden_layers"]
    first_moe = values.get("first_k_dense_replace", 0)
    n = full if layers == "full" else min(full, max(int(layers), first_moe + 1))
    config = CONFIG_MAPPING[model_type](**{**values, "num_hidden_layers": n})
    if model_type == "gpt_oss":
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), n, full


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def capture_ratios(model, tokens: int, batch: int, reps: int, device: str) -> dict:
    from deepseemoe.capture.consumers import ActivationCollector, RoutingRecorder
    from deepseemoe.capture.core import Site, run_capture
    from deepseemoe.models.load import handle_from_model

    handle = handle_from_model(model)
    layers = sorted(handle.moe_layers)
    ids = torch.randint(3, 30_000, (batch, tokens // batch), device=device)
    routing = RoutingRecorder(layers)
    block_in = ActivationCollector([Site("block_in", la) for la in layers], device=device)

    def bare():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def route():  # as `route` runs it
        run_capture(handle, ids, [routing], exclude_bos=False)
        routing.clear()

    def hooks_only():
        run_capture(handle, ids, [routing], exclude_bos=False, stop_early=False)
        routing.clear()

    def dictionary():
        run_capture(handle, ids, [routing, block_in], exclude_bos=False)
        routing.clear()
        block_in.chunks = {s: [] for s in block_in.sites}

    fns = {"bare": bare, "route": route, "hooks_only": hooks_only, "routing+block_in": dictionary}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"moe_layers": len(layers), "tokens": ids.numel(),
            **{f"{k}_tok_s": ids.numel() / v for k, v in med.items()},
            **{f"{k}_ratio": med["bare"] / v for k, v in med.items() if k != "bare"}}


def route_runs(model, name: str, procs: list[int], route_tokens: int, device: str, dtype: str, work: Path) -> list:
    from deepseemoe.models.tiny import tiny_tokenizer

    folder = work / name
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    corpus = work / "text.jsonl"
    if not corpus.exists():
        words = re.findall(r"\w+", "the expert router sends each token to a few experts of its layer and the "
                                    "rest stay idle while attention mixes positions and norms keep scales fixed")
        with open(corpus, "w") as f:
            for d in range(4000):
                f.write(json.dumps({"text": " ".join(words[(d * 7 + i * 3) % len(words)] for i in range(300))}) + "\n")
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for n in procs:
        out = work / f"run-{name}-{n}"
        route = ["route", str(folder), "--data", str(corpus), "--out", str(out), "--overwrite", "--max-tokens",
                 str(route_tokens), "--ctx-len", "512", "--batch-size", "4", "--dtype", dtype,
                 *(["--device", "cuda"] if device.startswith("cuda") else [])]
        cmd = ([sys.executable, "-m", "deepseemoe.cli", *route] if n == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                "-m", "deepseemoe.cli", *route])
        if n > 1 and not device.startswith("cuda"):
            env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
        # through a fresh parent, whose RUSAGE_CHILDREN is then this run's alone (max over its processes)
        probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                 "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                 "sys.exit(r.returncode)")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"route with {n} process(es) failed:\n{proc.stderr[-2000:]}")
        said = re.search(r"\(([\d,]+) tok/s", proc.stdout)
        gpu = re.search(r"peak GPU memory ([\d.]+) GB", proc.stdout)
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"procs": n, "tok_s": int(said.group(1).replace(",", "")) if said else None, "wall_s": wall,
                     "peak_gpu_gb": float(gpu.group(1)) if gpu else None,
                     # the largest single process's peak: one rank (or the one process)
                     "peak_rss_gb": int(re.search(r"MAXRSS_KB (\d+)", proc.stderr).group(1)) / 1e6})
    shutil.rmtree(folder, ignore_errors=True)  # a whole model's folder is tens of GB
    return rows


def writer_peak(values: dict, full_layers: int) -> dict:
    """Peak GB of the route writer over 1M tokens at the model's full routing shape: one shard
    holding them all (no buffer limit), and with `route`'s default --buffer-gb 2."""
    experts = values.get("num_experts") or values.get("num_local_experts") or values.get("n_routed_experts")
    moe_layers = full_layers - values.get("first_k_dense_replace", 0)
    peaks = {}
    for label, buffer in (("one_shard", "1e6"), ("buffer_2gb", "2")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "route_writer_memory.py"), "--tokens", "1e6",
                               "--layers", str(moe_layers), "--top-k", str(values["num_experts_per_tok"]),
                               "--experts", str(experts), "--buffer-gb", buffer], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        last = (proc.stdout.strip().splitlines() or [""])[-1].split()
        peaks[label] = {"shards": int(last[1]), "peak_gb": float(last[2])} if len(last) >= 3 else proc.stderr[-300:]
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(REAL), choices=list(REAL))
    ap.add_argument("--layers", default="1", help="decoder layers to build (a number, or full)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per forward")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--route", action="store_true", help="also time `deepseemoe route` with --procs processes")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--route-tokens", type=int, default=8192)
    ap.add_argument("--writer", action="store_true", help="also the route writer's peak at 1M-token shards")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here too")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; {args.dtype}; {args.tokens} tokens/forward",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dsm-real-") as tmp:
        for name in args.models:
            t = time.perf_counter()
            model, n, full = build(name, args.layers, dtype, args.device)
            params = sum(p.numel() for p in model.parameters())
            row = {"model": name, "layers": n, "of": full, "params": params, "build_s": time.perf_counter() - t,
                   **capture_ratios(model, args.tokens, args.batch, args.reps, args.device)}
            print(f"{name:17s} {n}/{full} layers ({row['moe_layers']} MoE), {params / 1e9:.2f}B params | bare "
                  f"{row['bare_tok_s']:8,.0f} tok/s | route capture ×{row['route_ratio']:.3f} "
                  f"(hooks only ×{row['hooks_only_ratio']:.3f}) | routing + block_in "
                  f"×{row['routing+block_in_ratio']:.3f}", flush=True)
            if args.route:
                row["route"] = route_runs(model, name, args.procs, args.route_tokens, args.device, args.dtype,
                                          Path(tmp))
                for r in row["route"]:
                    print(f"{'':17s} route, {r['procs']} process(es): {r['tok_s']:,} tok/s, {r['wall_s']:.1f} s wall "
                          f"(model load included), peak {r['peak_rss_gb']:.2f} GB per process"
                          + (f", GPU {r['peak_gpu_gb']:.1f} GB" if r["peak_gpu_gb"] is not None else ""), flush=True)
            if args.writer:
                row["writer"] = writer_peak(REAL[name][1], full)
                w = row["writer"]
                print(f"{'':17s} writer, 1M tokens at the full {full} layers: one shard {w['one_shard']['peak_gb']:.2f} GB"
                      f"; --buffer-gb 2: {w['buffer_2gb']['peak_gb']:.2f} GB in {w['buffer_2gb']['shards']} shards",
                      flush=True)
            results.append(row)
            del model
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "results": results}, indent=1))


if __name__ == "__main__":
    main()
