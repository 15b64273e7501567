"""Scoring explanations, as delphi defines it, plus routing prediction for experts.

- detection: held-out activating examples (over activation quantiles) and non-activating ones
  (random, and hard: the unit's own top token where it stays silent); the scorer, given the
  explanation, says for each example whether the unit is active in it;
- fuzzing: activating examples with their active tokens marked, non-activating ones with as many
  tokens marked at random; the scorer says whether the marking is right;
- routing: held-out tokens, half routed to the expert, half not; the scorer says whether the marked
  (last) token goes to the expert. Token identity fitted on the explaining half is its baseline.

Examples go `n_per_prompt` to a prompt, in a seeded shuffled order; the answer is a list of 0/1
(the first [...] in it); an answer that is not such a list leaves its examples without prediction
(counted as failed, never guessed). Every score comes with the number of examples behind it and
the same scorer run with another unit's explanation (the shuffled baseline, which must sit at
chance for the score to mean anything).

Records are delphi's `ClassifierOutput` fields: str_tokens, activations, distance, activating,
prediction, probability, correct.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from deepseemoe.explain.backends import ChatBackend
from deepseemoe.explain.explainer import MARK_SHARE, Prompts, marked
from deepseemoe.explain.units import Example, TokenExample, UnitExamples

SCORERS = ("detection", "fuzz", "routing")


@dataclass
class Item:
    """One example as the scorer sees it, with its truth."""

    shown: str
    record: dict  # the delphi record, prediction filled in later


def detection_items(ex: UnitExamples) -> list[Item]:
    return [Item(e.text, _record(e, e.activating)) for e in [*ex.test, *ex.not_active]]


def fuzz_items(ex: UnitExamples, seed: int = 22) -> list[Item]:
    rng = random.Random(seed * 1_000_003 + ex.unit)
    active = [sum(a > MARK_SHARE * max(e.activations) for a in e.activations) for e in ex.test] or [1]
    n_wrong = max(1, math.ceil(sum(active) / len(active)))
    items = []
    for e in ex.test:  # marked where the unit is active: a right marking
        top = max(e.activations)
        items.append(Item(marked(e.tokens, [a > MARK_SHARE * top for a in e.activations]), _record(e, True)))
    for e in ex.not_active:  # as many tokens marked where it is silent: a wrong marking
        picks = set(rng.sample(range(len(e.tokens)), min(n_wrong, len(e.tokens)))) if e.tokens else set()
        items.append(Item(marked(e.tokens, [i in picks for i in range(len(e.tokens))]), _record(e, False)))
    return items


def routing_items(examples: list[TokenExample]) -> list[Item]:
    out = []
    for e in examples:
        shown = "".join(e.tokens[:-1]) + "<<" + e.tokens[-1] + ">>"
        acts = [0.0] * (len(e.tokens) - 1) + [e.weight]
        out.append(Item(shown, {"str_tokens": e.tokens, "activations": acts, "distance": 0 if e.routed else -1,
                                "activating": e.routed, "prediction": None, "probability": None, "correct": None}))
    return out


def _record(e: Example, truth: bool) -> dict:
    return {"str_tokens": e.tokens, "activations": e.activations, "distance": e.quantile, "activating": truth,
            "prediction": None, "probability": None, "correct": None}


def parse_answer(text: str | None, n: int) -> list[bool] | None:
    """The answer's first list of 0/1 as n booleans, or None. A list cut off by the token limit, or
    running on past n entries (small models copy the pattern), counts by its first n entries; a
    shorter one, or one holding anything but 0/1, is no answer."""
    if not text:
        return None
    m = re.search(r"\[([^\[\]]*)\]?", text)
    if not m:
        return None
    values = [v.strip() for v in m.group(1).split(",") if v.strip()]
    if len(values) < n or any(v not in ("0", "1") for v in values[:n]):
        return None
    return [v == "1" for v in values[:n]]


def score_items(backend: ChatBackend, prompts: Prompts, scorer: str, jobs: list[tuple[str, list[Item]]], *,
                n_per_prompt: int = 5, seed: int = 42, max_tokens: int | None = None) -> list[list[dict]]:
    """For each (explanation, items) job, the items' records with predictions (prompts of all jobs go
    to the backend together, so it can batch and run them concurrently)."""
    name = {"detection": "detection", "fuzz": "fuzz", "routing": "routing"}[scorer]
    system = prompts.text(f"{name}_system.txt")
    batches: list[tuple[int, list[Item]]] = []
    for j, (_, items) in enumerate(jobs):
        order = list(items)
        random.Random(seed).shuffle(order)
        batches += [(j, order[i:i + n_per_prompt]) for i in range(0, len(order), n_per_prompt)]
    messages = [[{"role": "system", "content": system},
                 {"role": "user", "content": prompts.render(f"{name}_user.j2", explanation=jobs[j][0],
                                                            examples=[it.shown for it in batch])}]
                for j, batch in batches]
    out: list[list[dict]] = [[] for _ in jobs]
    judge = getattr(backend, "judge", None)
    if judge is not None:  # a local model: a well-formed list by construction, with P(1) per entry
        probs = judge(messages, [len(b) for _, b in batches])
        for (j, batch), ps in zip(batches, probs, strict=True):
            for it, p in zip(batch, ps, strict=True):
                rec = dict(it.record)
                rec["prediction"], rec["probability"] = p > 0.5, p
                rec["correct"] = rec["prediction"] == rec["activating"]
                out[j].append(rec)
        return out
    # "[1,0,…]": about two tokens per example, and a few to spare
    answers = backend.complete_many(messages, max_tokens=max_tokens or 2 * n_per_prompt + 4, prefix="[")
    for (j, batch), answer in zip(batches, answers, strict=True):
        got = parse_answer(answer.text, len(batch))
        for k, it in enumerate(batch):
            rec = dict(it.record)
            if got is not None:
                rec["prediction"] = got[k]
                rec["correct"] = got[k] == rec["activating"]
            out[j].append(rec)
    return out


def metrics(records: list[dict]) -> dict:
    """Balanced accuracy, precision, recall, F1 over the records with a prediction; counts of all."""
    done = [r for r in records if r["prediction"] is not None]
    tp = sum(r["prediction"] and r["activating"] for r in done)
    tn = sum(not r["prediction"] and not r["activating"] for r in done)
    fp = sum(r["prediction"] and not r["activating"] for r in done)
    fn = sum(not r["prediction"] and r["activating"] for r in done)
    pos, neg = tp + fn, tn + fp
    tpr = tp / pos if pos else float("nan")
    tnr = tn / neg if neg else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * precision * tpr / (precision + tpr) if tp else (0.0 if pos else float("nan"))
    return {"balanced_accuracy": (tpr + tnr) / 2 if pos and neg else float("nan"), "precision": precision,
            "recall": tpr, "f1": f1, "auroc": auroc(done), "examples": len(records), "scored": len(done),
            "failed": len(records) - len(done)}


def auroc(records: list[dict]) -> float | None:
    """P(a random activating example gets a higher probability than a random silent one), ties
    half (the Mann–Whitney statistic); None without probabilities or without both classes."""
    scored = [(r["probability"], bool(r["activating"])) for r in records if r.get("probability") is not None]
    pos = [p for p, a in scored if a]
    neg = [p for p, a in scored if not a]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def predictions_metrics(truth: list[bool], predicted: list[bool]) -> dict:
    """The same metrics for a baseline's predictions."""
    return metrics([{"activating": t, "prediction": p} for t, p in zip(truth, predicted, strict=True)])


def shuffled(explanations: dict[int, str]) -> dict[int, str]:
    """Each unit gets another unit's explanation (a rotation: nobody keeps its own)."""
    units = sorted(explanations)
    if len(units) < 2:
        return {}
    return {u: explanations[units[(i + 1) % len(units)]] for i, u in enumerate(units)}
