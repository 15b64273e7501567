"""Benchmark: the explorer's server time per page type on a study at scale, and the model-backed
views' tokens/s.

    python bench/serve_pages.py                         # 10M tokens × 16 layers × top-8 of 64, 64k features
    python bench/serve_pages.py --tokens 1e6 --features 8192 --dir /tmp/sp --reuse

The study is synthetic, written through the project's own writers: the routing run of
bench/routing_stats.py (skewed routing, 1M-token shards) with its statistics (`stats`, no figures),
and beside it a dictionary run whose map and descriptions have the shape `map` and `explain` give a
dictionary of `--features` features at one layer (features.parquet, feature_experts with the
features' top experts, router_attribution and expert_composition of every feature × expert,
examples.json with 5 top and 4 × 5 quantile examples each, one description per feature).

Pages are requested through the framework's test client in this process (server time: routing,
handler, queries and template, without the network), each kind first cold (first request after
start: analyses tables read; after the warm-up `serve` runs in the background at start, which hashes the
shards against the manifest and parses the examples and descriptions, timed apart) and then warm over `--repeats` random units. The peer for the model-backed views is a bare forward of the same model on the same tokens:
the ratio is what the text view and the playground cost beyond it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_stats import synthetic_run

WORDS = ("code", "German", "numbers", "punctuation", "names", "verbs", "Russian", "brackets", "dates", "Bible")


def build_study(root: Path, tokens: int, layers: int, top_k: int, experts: int, features: int, reuse: bool) -> None:
    import pyarrow as pa

    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.formats import save_native
    from deepseemoe.routing.stats import compute_routing_stats, save_routing_stats
    from deepseemoe.runs.dictionary import DictionaryRun
    from deepseemoe.runs.explanations import ExplanationStore

    run = root / "run"
    if not (reuse and (run / "analyses" / "manifest.json").exists()):
        t = time.perf_counter()
        synthetic_run(run, tokens, layers, top_k, experts, vocab=50_000)
        save_routing_stats(compute_routing_stats(run, progress=False), figures=False)
        print(f"routing run and statistics written in {time.perf_counter() - t:.0f} s", flush=True)
    d = DictionaryRun(root / "dictionaries")
    name, layer = "sae", layers // 2
    if reuse and (d.map_dir(name) / "summary.json").exists():
        return
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    d.path.mkdir(parents=True, exist_ok=True)
    d.save_config({"synthetic": True})
    save_native(build_coder(CoderConfig(d_in=64, n_latents=features, k=32)), d.coder_dir(name),
                {"source": [["block_in", layer]]})
    d.save_evaluation({"coders": {name: {"kind": "sae", "fvu": 0.2, "l0": 32.0, "dead": 0.01}}})
    F, E = features, experts
    top = rng.integers(0, E, F)
    feats = pa.table({"feature": np.arange(F), "fires": rng.integers(1, 10_000, F), "specificity": rng.random(F),
                      "top_expert": top, "top_lift": rng.random(F) * 8, "top_mi_expert": top,
                      "top_mi_bits": rng.random(F) / 10})
    per = 8  # experts with a count per feature
    fe_f = np.repeat(np.arange(F), per)
    fe_e = (top[:, None] + np.arange(per)[None, :] * 7) % E
    fe = pa.table({"feature": fe_f, "expert": fe_e.reshape(-1), "count": rng.integers(3, 500, F * per),
                   "p_e_given_f": rng.random(F * per), "lift": rng.random(F * per) * 8, "mi_bits": rng.random(F * per) / 10})
    all_f, all_e = np.repeat(np.arange(F), E), np.tile(np.arange(E), F)
    attribution = pa.table({"feature": all_f, "expert": all_e, "logit_per_unit": rng.normal(size=F * E).astype(np.float32),
                            "push_per_unit": rng.normal(size=F * E).astype(np.float32),
                            "mean_push_when_active": rng.normal(size=F * E).astype(np.float32),
                            "mean_push_per_token": rng.normal(size=F * E).astype(np.float32)})
    composition = pa.table({"expert": np.repeat(np.arange(E), F), "feature": np.tile(np.arange(F), E),
                            "share": rng.random(F * E).astype(np.float32) / F})

    def example(a: float) -> dict:
        return {"activation": a, "experts": rng.integers(0, E, top_k).tolist(), "text": "the quick brown fox jumps ov",
                "token": "er"}

    examples = {str(f): {"top": [example(5.0 - i / 10) for i in range(5)],
                         "quantiles": [[example(1.0 + q) for _ in range(5)] for q in range(4)]} for f in range(F)}
    summary = {"dictionary": name, "layer": layer, "top_k": top_k, "num_experts": E, "tokens": tokens,
               "live_features": F, "features": F, "specificity_median": 0.4, "expert_specific_share": 0.2,
               "routing_prediction": {"features": 0.7, "token": 0.6, "bigram": 0.6, "load_only": 0.3, "test_tokens": 1}}
    d.save_map(name, {"features": feats, "feature_experts": fe, "router_attribution": attribution,
                      "expert_composition": composition}, examples, summary)
    store = ExplanationStore(d.path / "explanations" / name, name)
    store.save_explanations({f: f"fires on {WORDS[f % len(WORDS)]} and {WORDS[(f * 7) % len(WORDS)]} (#{f})"
                             for f in range(F)})
    print(f"dictionary of {F:,} features with map and descriptions written in {time.perf_counter() - t:.0f} s", flush=True)


def time_pages(root: Path, repeats: int, seed: int) -> list[tuple[str, float, float, float]]:
    from fastapi.testclient import TestClient

    from deepseemoe.explore.app import Explorer, RateLimit, create_app

    t = time.perf_counter()
    explorer = Explorer.open([root], model="none", rate=RateLimit(rate=1e6, burst=10**6))
    opened = time.perf_counter() - t
    t = time.perf_counter()
    explorer.warm()  # what `serve` does in a background thread at start
    warmed = time.perf_counter() - t
    client = TestClient(create_app(explorer))
    view = next(iter(explorer.studies.values()))
    key = view.key
    rng = random.Random(seed)
    dictionary = next(iter(view.dictionaries))
    F = view.dictionaries[dictionary].features
    docs = [d for _, d in view.first_documents()]
    last_doc = int(view.doc_column(view.run.parts[-1])[-1])
    kinds = {
        "overview": lambda: f"/s/{key}?layer={rng.choice(view.layers)}",
        "document": lambda: f"/s/{key}/doc/{rng.choice([*docs, rng.randrange(last_doc + 1)])}",
        "expert": lambda: f"/s/{key}/expert/{rng.choice(view.layers)}/{rng.randrange(view.num_experts)}",
        "feature": lambda: f"/s/{key}/feature/{dictionary}/{rng.randrange(F)}",
        "search (words)": lambda: f"/s/{key}/search?q={rng.choice(WORDS)}",
    }
    rows = []
    print(f"opened the study in {opened * 1000:.0f} ms; background warm-up (shards hashed, examples and "
          f"descriptions parsed) {warmed:.1f} s", flush=True)
    for kind, url in kinds.items():
        u = url()
        t = time.perf_counter()
        r = client.get(u)
        cold = time.perf_counter() - t
        assert r.status_code == 200, (u, r.status_code, r.text[:300])
        times, sizes = [], []
        for _ in range(repeats):
            u = url()
            t = time.perf_counter()
            r = client.get(u)
            times.append(time.perf_counter() - t)
            sizes.append(len(r.content))
            assert r.status_code == 200, (u, r.status_code, r.text[:300])
        times.sort()
        rows.append((kind, cold, statistics.median(times), times[round(0.95 * (len(times) - 1))]))
        print(f"{kind:16s} cold {cold * 1000:8.1f} ms   warm median {rows[-1][2] * 1000:7.1f} ms   "
              f"p95 {rows[-1][3] * 1000:7.1f} ms   ({repeats} pages, median {statistics.median(sizes) / 1000:.0f} kB)", flush=True)
    return rows


def time_model_views(repeats: int) -> None:
    """tokens/s of the text view and the playground on a tiny OLMoE (random weights, 16 layers × 64
    experts top-8), beside a bare forward of the same tokens."""
    import torch

    from deepseemoe.models.tiny import tiny_model

    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="dsm-serve-model-"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.conftest import build_tokenizer

    tok = build_tokenizer(folder)
    model = tiny_model("olmoe", vocab_size=len(tok), num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                       bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    try:
        _time_live(folder, repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _time_live(folder: Path, repeats: int) -> None:
    import torch

    from deepseemoe.explore.live import Intervention, Limits, LiveModel
    from deepseemoe.models.load import handle_from_model

    live = LiveModel(str(folder), limits=Limits(ctx_len=256))
    text = " ".join(["The king said unto his servants, go forth and gather the harvest before the rain."] * 8)
    live.route(text)  # warm-up
    handle = handle_from_model(live.handle.model, live.handle.tokenizer)
    batch = live.batches(text)[0]
    bare, routed, played = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = live.route(text)
        routed.append(time.perf_counter() - t)
        t = time.perf_counter()
        live.intervene(text, Intervention("exclude", sorted(handle.moe_layers)[0], [0, 1]))
        played.append(time.perf_counter() - t)
    n = len(r.tokens)
    b, ro, pl = (statistics.median(x) for x in (bare, routed, played))
    print(f"model-backed ({n} tokens, tiny OLMoE 16 layers × 64 experts top-8, 2 threads): bare forward "
          f"{n / b:,.0f} tok/s; text view {n / ro:,.0f} tok/s ({ro / b:.2f}× the bare forward); playground "
          f"(exclude 2 experts: ΔCE, KL, next token, routing) {n / pl:,.0f} tok/s ({pl / b:.2f}×)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=1e7)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--features", type=int, default=65_536)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the study (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="time the study already in --dir")
    ap.add_argument("--no-model", action="store_true", help="skip the model-backed views")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    root = args.dir or Path(tempfile.mkdtemp(prefix="dsm-serve-"))
    try:
        build_study(root, int(args.tokens), args.layers, args.topk, args.experts, args.features, args.reuse)
        print(json.dumps({"tokens": int(args.tokens), "layers": args.layers, "top_k": args.topk,
                          "experts": args.experts, "features": args.features, "study": str(root)}), flush=True)
        time_pages(root, args.repeats, args.seed)
        if not args.no_model:
            time_model_views(args.repeats)
    finally:
        if args.dir is None:  # ours to remove: a 1e7-token study is gigabytes
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
