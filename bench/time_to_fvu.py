"""Benchmark: wall-clock time to a held-out FVU — ours vs sparsify vs SAELens, each through its own trainer.

    python bench/time_to_fvu.py [--sizes 128:4096:32,512:16384:32,1024:32768:64] [--seconds 60]
        [--repeats 3] [--peers ours,sparsify,saelens] [--data planted | --data demo:SITE] [--batch 4096]
        [--eval-every 5] [--out results.json]

What a user pays for is time to a dictionary of a given quality. Every run is its own process with
2 threads, the peers interleaved within each repeat, on the same activations (a training pool,
cycled, and 8,192 held-out rows). Each peer runs its own trainer entry point at its own defaults,
building a TopK SAE of width F and k:
- ours: `CoderTrainer({...}, TrainConfig(batch_size)).fit(...)` on `CoderConfig(d_in, n_latents=F, k)`;
- sparsify: `Trainer(TrainConfig(SparseCoderConfig(num_latents=F, k=k), batch_size=B/S,
  hookpoints=["layers.0"]), dataset, model).fit()` — sparsify trains from a model's hooks, so the
  model is a stand-in whose one layer outputs the activation rows its token ids name (S = 256 rows
  per "sequence");
- SAELens: `SAETrainer(SAETrainerConfig(...), TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae=F,
  k)), data_provider).fit()` with batches of B rows.
Held-out FVU = Σ‖x − x̂‖² / Σ‖x − mean‖² on the held-out rows, measured every `--eval-every` steps
with the clock paused (sparsify's schedule-free optimizer switched to its averaged weights for the
measurement, as its own checkpointing does), so the curve's seconds are training time only, setup
included. Reported per size: each peer's curve (seconds, tokens, FVU), its throughput, the target
FVU (the FVU sparsify reaches within its budget in every repeat), the time each peer first reaches
it (median over repeats), and the ratio to sparsify's.

Data: `planted` (sparse features of random directions plus a mean offset and noise, the
residual-stream shape `bench/train_vs_sparsify.py` uses) or `demo:SITE` (SITE resid_out, block_in or
block_out of the demo MoE's middle layer, captured from its held-out text; needs a demo run in the
cache, and fixes D to the demo's width).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HELD = 8192
TARGETS = (0.5, 0.3, 0.25, 0.2)  # quality levels every table reports beside sparsify's own FVU
SEQ = 256  # rows per sparsify "sequence"


class OutOfTime(Exception):
    """Raised from inside a peer's loop when its training budget is spent."""


class Clock:
    """Training seconds (evaluation excluded) and the curve of held-out FVU against them."""

    def __init__(self, budget: float, held: torch.Tensor, every: int, batch: int):
        self.budget, self.held, self.every, self.batch = budget, held, every, batch
        self.denominator = float((held - held.mean(0)).pow(2).sum())
        self.start = time.perf_counter()
        self.paused = 0.0
        self.steps = 0
        self.points: list[dict] = []

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def tick(self, reconstruct) -> None:
        """Called once before each training step: evaluate every `every` steps, stop past the budget."""
        if self.steps % self.every == 0 or self.seconds() >= self.budget:
            t = time.perf_counter()
            with torch.no_grad():
                recon = torch.cat([reconstruct(b) for b in self.held.split(4096)])
            fvu = float((self.held - recon).pow(2).sum()) / self.denominator
            self.points.append({"step": self.steps, "tokens": self.steps * self.batch, "seconds": self.seconds(),
                                "fvu": fvu})
            self.paused += time.perf_counter() - t
        if self.seconds() >= self.budget:
            raise OutOfTime
        self.steps += 1


def planted(n: int, d: int, seed: int = 0) -> torch.Tensor:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_vs_sparsify import activations

    return activations(n, d, seed)


def demo_rows(site: str, n: int) -> torch.Tensor:
    """Rows of SITE at the demo MoE's middle layer on the demo's held-out text (cycled to n)."""
    from deepseemoe.capture.core import Site, run_capture
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model
    from deepseemoe.zoo.train import default_cache_dir

    found = sorted((default_cache_dir() / "zoo").glob("demo-*/moe/config.json"))
    corpus = Path("runs/demo/corpus/val.jsonl")
    if not found or not corpus.exists():
        sys.exit("error: --data demo:SITE needs the demo's models and corpus; run `deepseemoe demo` first")
    handle = load_model(str(found[0].parent))
    layer = handle.num_layers // 2
    rows = []
    batches = pack_documents(handle.tokenizer, iter_documents(TextSource(str(corpus), domain_field="domain")),
                             ctx_len=128, batch_size=16, max_tokens=min(n, 400_000))
    want = Site(site, layer)

    class Keep:
        sites = (want,)

        def consume(self, batch) -> None:
            rows.append(batch[want].float().cpu())

    for b in batches:
        run_capture(handle, b.input_ids, [Keep()], attention_mask=b.attention_mask, keep=b.keep)
    x = torch.cat(rows)
    return x[torch.arange(n) % len(x)]


# ---- workers: one peer, one process ------------------------------------------------------------------

def work_ours(x, clock, F, k, batch):
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.trainer import CoderTrainer, TrainConfig

    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=x.shape[1], n_latents=F, k=k))
    trainer = CoderTrainer({"sae": coder}, TrainConfig(batch_size=batch))

    def stream():
        while True:
            for i in range(0, len(x) - batch + 1, batch):
                yield {"sae": (x[i:i + batch], x[i:i + batch])}

    def reconstruct(h):
        coder.eval()
        try:
            return coder(h).out
        finally:
            coder.train()

    clock.tick(reconstruct)  # the untrained dictionary, like the others' first point
    # its stream feeds a shuffle buffer ahead of the steps, so the clock ticks after each step
    trainer.fit(stream(), max_steps=10**9, on_step=lambda metrics: clock.tick(reconstruct))


def work_sparsify(x, clock, F, k, batch):
    from sparsify import SparseCoderConfig, Trainer
    from sparsify import TrainConfig as SparsifyConfig

    class Rows(torch.utils.data.Dataset):  # "token ids" are row numbers of the pool, cycled
        def __len__(self):
            return 10**9

        def __getitem__(self, i):
            return {"input_ids": (torch.arange(SEQ) + i * SEQ) % len(x)}

    class StandIn(torch.nn.Module):
        """A model whose only layer outputs the activation rows its token ids name."""

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity()])
            self.trainer = None

        base_model = property(lambda self: self)
        device = property(lambda self: torch.device("cpu"))
        dummy_inputs = property(lambda self: {"input_ids": torch.zeros(1, SEQ, dtype=torch.long)})

        def forward(self, input_ids, **kwargs):
            if self.trainer is not None:
                clock.tick(self.reconstruct)
            return self.layers[0](x[input_ids])

        def reconstruct(self, h):
            (sae,) = self.trainer.saes.values()
            opts = [o for o in self.trainer.optimizers if hasattr(o, "eval")]
            for o in opts:  # schedule-free: its averaged weights, as its checkpoints hold them
                o.eval()
            try:
                return sae(h).sae_out
            finally:
                for o in opts:
                    o.train()

    model = StandIn()
    cfg = SparsifyConfig(SparseCoderConfig(num_latents=F, k=k), batch_size=max(1, batch // SEQ),
                         hookpoints=["layers.0"], log_to_wandb=False, save_every=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # its checkpoints go to ./checkpoints
        trainer = Trainer(cfg, Rows(), model)
        model.trainer = trainer
        trainer.fit()


def work_saelens(x, clock, F, k, batch):
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=F, k=k))

    def rows():
        while True:
            for i in range(0, len(x) - batch + 1, batch):
                clock.tick(lambda h: sae(h))
                yield x[i:i + batch]

    # lr_end: what SAELens' runner config sets it to by default (lr / 10; unused by its constant schedule)
    cfg = SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=batch, lr_end=3e-4 / 10)
    SAETrainer(cfg, sae, rows()).fit()


WORKERS = {"ours": work_ours, "sparsify": work_sparsify, "saelens": work_saelens}
IMPORTS = {"ours": ["deepseemoe.dictionaries.trainer"], "sparsify": ["sparsify"],
           "saelens": ["sae_lens", "sae_lens.saes.topk_sae"]}


def worker(args) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    data = load_file(args.acts)
    for module in IMPORTS[args.worker]:  # importing a library is not training: before the clock starts
        importlib.import_module(module)
    # likewise torch's own lazy imports on a process's first optimizer (about 1 s, whoever builds it)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    clock = Clock(args.seconds, data["held"], args.eval_every, args.batch)
    clock.start = time.perf_counter()  # setup inside the peer's entry point counts; loading the file does not
    with contextlib.suppress(OutOfTime):
        WORKERS[args.worker](data["train"], clock, args.F, args.k, args.batch)
    steps = clock.steps
    Path(args.result).write_text(json.dumps({"peer": args.worker, "points": clock.points, "steps": steps,
                                             "tokens_per_s": steps * args.batch / max(clock.seconds(), 1e-9)}))


# ---- the parent: data, interleaved runs, the table -------------------------------------------------

def fvu_at_tokens(points: list[dict], tokens: float) -> float:
    """The FVU of the last evaluation made after at most `tokens` training tokens."""
    return [p for p in points if p["tokens"] <= tokens][-1]["fvu"]


def first_reach(points: list[dict], target: float) -> float | None:
    return next((p["seconds"] for p in points if p["fvu"] <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128:4096:32,512:16384:32,1024:32768:64", help="D:F:k,...")
    ap.add_argument("--seconds", type=float, default=60.0, help="Training seconds per run.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peers", default="ours,sparsify,saelens")
    ap.add_argument("--data", default="planted", help="planted or demo:SITE (resid_out, block_in, block_out).")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--pool-floats", type=float, default=2**26, help="Training pool size in floats (cycled).")
    ap.add_argument("--out", default=None, help="Write every curve here as JSON.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--acts", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--F", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from safetensors.torch import save_file

    peers = args.peers.split(",")
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            D, F, k = (int(v) for v in size.split(":"))
            n = int(args.pool_floats // D) // args.batch * args.batch
            if args.data == "planted":
                rows = planted(n + HELD, D)
            else:
                rows = demo_rows(args.data.split(":", 1)[1], n + HELD)
                D = rows.shape[1]
                rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
            acts = Path(tmp) / f"acts_{D}.safetensors"
            save_file({"train": rows[:n].contiguous(), "held": rows[n:].contiguous()}, str(acts))
            runs: dict[str, list[dict]] = {p: [] for p in peers}
            for r in range(args.repeats):
                for peer in peers:  # interleaved: a slow patch of the machine hits every peer alike
                    out = Path(tmp) / f"{peer}_{D}_{r}.json"
                    cmd = [sys.executable, __file__, "--worker", peer, "--acts", str(acts), "--result", str(out),
                           "--F", str(F), "--k", str(k), "--batch", str(args.batch), "--seconds", str(args.seconds),
                           "--eval-every", str(args.eval_every)]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"error: {peer} failed at D={D}:\n{done.stderr[-3000:]}")
                    runs[peer].append(json.loads(out.read_text()))
            report.append(summarise(D, F, k, args, runs))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def reprint(path: str) -> None:
    """The tables again from a saved --out file: python -c 'import time_to_fvu as t; t.reprint("r.json")'."""
    for size in json.loads(Path(path).read_text()):
        args = argparse.Namespace(batch=size["batch"], seconds=size["seconds"], data=size["data"],
                                  repeats=len(next(iter(size["runs"].values()))))
        summarise(size["D"], size["F"], size["k"], args, size["runs"])


def summarise(D: int, F: int, k: int, args, runs: dict[str, list[dict]]) -> dict:
    finals = {p: statistics.median(r["points"][-1]["fvu"] for r in rs) for p, rs in runs.items()}
    # the FVU sparsify reaches within its budget in every repeat (its worst final FVU)
    target = max(r["points"][-1]["fvu"] for r in runs["sparsify"]) if "sparsify" in runs else min(finals.values())
    print(f"\nD={D} F={F} k={k} batch={args.batch}, {args.seconds:.0f} s per run, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads here / 2 per run; data {args.data}; target FVU {target:.3f} "
          "(sparsify's worst final FVU over the repeats)")
    # and fixed quality levels: sparsify's default lr warm-up (1000 steps) can hold it at its
    # first-step FVU for a whole short budget, and then "its FVU" is only the time to one step
    levels = [target, *sorted((t for t in TARGETS if t < target), reverse=True)]
    print(f"{'peer':>9} {'tok/s':>9} {'final FVU':>10}  " + "  ".join(f"{'s to ' + format(t, '.3f'):>16}"
                                                                     for t in levels))
    reach: dict[float, dict[str, float | None]] = {}
    for t in levels:
        reach[t] = {}
        for p, rs in runs.items():
            times = [first_reach(r["points"], t) for r in rs]
            reach[t][p] = statistics.median(times) if all(x is not None for x in times) else None
    for p, rs in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        cells = []
        for t in levels:
            mine, theirs = reach[t][p], reach[t].get("sparsify")
            ratio = f" ({theirs / mine:.2f}x)" if mine and theirs and p != "sparsify" else ""
            cells.append(f"{(f'{mine:.1f}' if mine is not None else '—') + ratio:>16}")
        print(f"{p:>9} {tps:9,.0f} {finals[p]:10.3f}  " + "  ".join(cells))
    print("  (seconds of training to first reach each FVU, median over repeats; — not reached in every repeat;"
          " (×) sparsify's time / this peer's)")
    # quality per token: each peer's FVU at the last evaluation within the tokens sparsify trained on
    if "sparsify" in runs:
        budget = statistics.median(r["points"][-1]["tokens"] for r in runs["sparsify"])
        at_tokens = {p: statistics.median(fvu_at_tokens(r["points"], budget) for r in rs) for p, rs in runs.items()}
        print(f"  FVU at {budget:,.0f} tokens (sparsify's budget): "
              + ", ".join(f"{p} {v:.3f}" for p, v in at_tokens.items()))
    for p, rs in runs.items():  # the curve of the first repeat, a few points
        pts = rs[0]["points"]
        shown = pts[:: max(1, len(pts) // 8)] + ([pts[-1]] if len(pts) > 1 else [])
        print(f"  {p:>8} curve (s: FVU): " + ", ".join(f"{q['seconds']:.0f}: {q['fvu']:.3f}" for q in shown))
    return {"D": D, "F": F, "k": k, "batch": args.batch, "seconds": args.seconds, "data": args.data,
            "target_fvu": target, "seconds_to": {str(t): r for t, r in reach.items()}, "final_fvu": finals,
            "fvu_at_sparsify_tokens": at_tokens if "sparsify" in runs else None,
            "runs": runs}


if __name__ == "__main__":
    main()
