"""The offline explainer and judges on a task whose answers are known.

Four planted "features" over the demo corpus's held-out text, tokenised with SmolLM2's tokenizer:
a unit active on digit tokens, on capitalised words, on "(" and on the word "the". For each,
held-out windows of 16 tokens where it is active (activations on exactly those tokens) and as many
where it is not, built exactly as the scorers see them (`detection_items`). Each judge scores the
true description and, as the null, another unit's description (the shuffled baseline):

  embedding   all-MiniLM-L6-v2 (explain/embedding.py)
  smollm2     SmolLM2-135M-Instruct judging one example per prompt by P(1) (the LLM judge)

and SmolLM2 explains each unit from its own training windows (the demo's prompts), scored by the
embedding judge, with whether its description names the planted answer. Prints balanced accuracy,
AUROC and seconds per judged example. Run: .venv/bin/python bench/judge_known_answer.py
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

UNITS = {  # unit: (description, is the token active?, words a right description names)
    0: ("digits and numbers", lambda t: t.strip().isdigit(), ("digit", "number", "numer")),
    1: ("words that start with a capital letter", lambda t: t.strip()[:1].isupper() and t.strip().isalpha(),
        ("capital", "uppercase", "upper-case", "proper")),
    2: ("an opening parenthesis '('", lambda t: "(" in t, ("parenthes", "bracket", "(")),
    3: ("the word 'the'", lambda t: t.strip().lower() == "the", ("the",)),
}
WINDOW, N = 16, 10


def windows(tokenizer, texts: list[str], active, rng: random.Random) -> tuple[list, list]:
    from deepseemoe.explain.units import Example

    on, off = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        pieces = [tokenizer.decode([i]) for i in ids]
        for start in range(0, len(pieces) - WINDOW, WINDOW):
            toks = pieces[start: start + WINDOW]
            acts = [1.0 if active(t) else 0.0 for t in toks]
            (on if any(acts) else off).append(Example(toks, acts, 0 if any(acts) else -1))
    rng.shuffle(on)
    rng.shuffle(off)
    return on, off


def main() -> None:
    from transformers import AutoTokenizer

    from deepseemoe.explain.backends import LocalChat
    from deepseemoe.explain.embedding import EmbeddingJudge
    from deepseemoe.explain.explainer import Prompts, explain
    from deepseemoe.explain.scorers import detection_items, metrics, score_items, shuffled
    from deepseemoe.explain.units import UnitExamples
    from deepseemoe.models.smollm2 import smollm2_folder
    from deepseemoe.zoo.train import default_cache_dir

    corpus = ROOT / "runs" / "demo" / "corpus" / "val.jsonl"
    if not corpus.exists():
        sys.exit(f"error: {corpus} is missing; run `deepseemoe demo` (or `deepseemoe corpus build --out runs/demo/corpus`) first")
    texts = [json.loads(line)["text"][:1200] for line in corpus.open()][:300]
    chat = LocalChat.smollm2(default_cache_dir() / "explain")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(default_cache_dir()))
    rng = random.Random(0)
    units = {}
    for u, (_, active, _) in UNITS.items():
        on, off = windows(tokenizer, texts, active, rng)
        units[u] = UnitExamples(u, train=on[N: N + 8], test=on[:N // 2], not_active=off[:N // 2])
    truth = {u: d for u, (d, _, _) in UNITS.items()}
    prompts = Prompts.load()
    rows = []

    def judged(judge, name: str, descriptions: dict[int, str]) -> None:
        for label, texts_ in (("true", descriptions), ("shuffled", shuffled(descriptions))):
            jobs = [(texts_[u], detection_items(units[u])) for u in units]
            start = time.perf_counter()
            got = score_items(judge, prompts, "detection", jobs)
            seconds = time.perf_counter() - start
            m = metrics([r for recs in got for r in recs])
            rows.append((name, label, m["balanced_accuracy"], m["auroc"], seconds / sum(len(j[1]) for j in jobs)))

    embedder = EmbeddingJudge.minilm()
    embedder.embed(["warm up"])
    judged(embedder, "embedding judge, planted descriptions", truth)
    judged(chat, "SmolLM2 judge, planted descriptions", truth)
    start = time.perf_counter()
    written = explain(chat, prompts, {u: ex.train for u, ex in units.items()}, {}, retries=1)
    explain_s = (time.perf_counter() - start) / len(units)
    judged(embedder, "embedding judge, SmolLM2's descriptions", written)
    print(f"{'judge, descriptions':44s} {'given':9s} {'bal.acc':>8s} {'AUROC':>6s} {'s/example':>10s}")
    for name, label, ba, auc, s in rows:
        print(f"{name:44s} {label:9s} {ba:8.2f} {auc if auc is not None else float('nan'):6.2f} {s:10.4f}")
    print(f"\nSmolLM2's descriptions ({explain_s:.1f} s per unit):")
    for u, text in written.items():
        named = any(re.search(re.escape(w), text, re.I) for w in UNITS[u][2])
        print(f"  planted '{UNITS[u][0]}': {text!r} — {'names it' if named else 'does not name it'}")


if __name__ == "__main__":
    main()
