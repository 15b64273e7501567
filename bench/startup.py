"""Benchmark: how long a verb takes to start, in fresh processes (what a user waits for at the prompt).

    python bench/startup.py                    # a tiny OLMoE folder written here, 5 runs of each
    python bench/startup.py --model PATH --repeats 9

Times, each a new Python process, median of --repeats: `deepseemoe --help`; `deepseemoe inspect
FOLDER` the first time (empty structure cache: imports torch and transformers and builds the model
on the meta device) and again (the structure read from `$DEEPSEEMOE_CACHE/structure/`). The peer
is what a user without DeepSeeMoE runs to see the same structure: transformers' own
`AutoConfig.from_pretrained` + `AutoModelForCausalLM.from_config` on the meta device, printing the
module tree. The ratios are ours over the peer's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    print(AutoModelForCausalLM.from_config(config))
"""


def timed(cmd: list[str], env: dict, before=None) -> float:
    if before is not None:
        before()
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a local model folder (default: a tiny OLMoE)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsm-startup-"))
    model = args.model
    if model is None:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Writing model shards" bar
        from deepseemoe.models.tiny import tiny_model

        model = work / "olmoe"
        tiny_model("olmoe", num_hidden_layers=16).save_pretrained(model)
    cache = work / "cache"
    env = {**os.environ, "DEEPSEEMOE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    exe = [sys.executable, "-m", "deepseemoe.cli"]

    def empty_cache():
        shutil.rmtree(cache / "structure", ignore_errors=True)

    rows = {
        "deepseemoe --help": [timed([*exe, "--help"], env) for _ in range(args.repeats)],
        "inspect, first time": [timed([*exe, "inspect", str(model)], env, empty_cache) for _ in range(args.repeats)],
        "inspect, again (cached)": [timed([*exe, "inspect", str(model)], env) for _ in range(args.repeats)],
        "peer: transformers from_config (meta)": [timed([sys.executable, "-c", PEER, str(model)], env)
                                                  for _ in range(args.repeats)],
    }
    peer = statistics.median(rows["peer: transformers from_config (meta)"])
    print(f"model {model}; median of {args.repeats} fresh processes, {os.cpu_count()} CPUs")
    for name, times in rows.items():
        m = statistics.median(times)
        print(f"{name:40s} {m:6.2f} s   (min {min(times):.2f} s)   ×{m / peer:.2f} the peer's time")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
