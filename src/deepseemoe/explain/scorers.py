"""Scoring explanations, as delphi defines it, plus routing prediction for experts.

- detection: held-out activating examples (over activation quantiles) and non-activating ones
  (random, and hard: the unit's own top token where it stays silent); the scorer, given the
  explanation, says for each example whether the unit is active in it;
- fuzzing: activating examples with their active tokens marked, non-activating ones with as many
  tokens marked at random; the scorer says whether the marking is right;
- routing: held-out tokens, half routed to the expert, half not; the scorer says whether the marked
  (last) token goes to the expert. Token identity fitted on the explaining half is its baseline.

Each example is judged on its own prompt, by the judge's probability of "1" against "0" as its
first answer token (`backends.judge_many`: a local model's logits, an endpoint's log-probabilities;
an endpoint without them gives its digit, and no probability). Several examples to one prompt
with a list for an answer ("for instance [1,0,0,1,1]") measured the prompt, not the description:
SmolLM2-135M answered the example list itself to every prompt. An answer without a 0/1 leaves its
example without prediction (counted as failed, never guessed). Every score comes with the number of
examples behind it, the same scorer run with another unit's explanation (the shuffled baseline,
which must sit at chance for the score to mean anything), and the judge's answer distribution:
a judge whose P(1) does not move with its input, or that answers one class only, is flagged
(`judge_check`), since its balanced accuracy is 0.5 or its AUROC noise whatever the description.

Records are delphi's `ClassifierOutput` fields: str_tokens, activations, distance, activating,
prediction, probability, correct.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from deepseemoe.explain.backends import ChatBackend, parse_digit
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


def score_items(backend: ChatBackend, prompts: Prompts, scorer: str, jobs: list[tuple[str, list[Item]]]
                ) -> list[list[dict]]:
    """For each (explanation, items) job, the items' records with predictions: one prompt per item
    (prompts of all jobs go to the backend together, so it can batch and run them concurrently),
    or, for an embedding judge, the explanation's similarity to each item's text."""
    name = {"detection": "detection", "fuzz": "fuzz", "routing": "routing"}[scorer]
    flat = [(j, it) for j, (_, items) in enumerate(jobs) for it in items]
    pairs = getattr(backend, "judge_pairs", None)
    if pairs is not None:  # an embedding judge (explain/embedding.py): the description beside each example's text
        verdicts = [v for job in pairs([(text, [it.shown for it in items]) for text, items in jobs]) for v in job]
    else:
        system = prompts.text(f"{name}_system.txt")
        verdicts = judge_many(backend, [
            [{"role": "system", "content": system},
             {"role": "user", "content": prompts.render(f"{name}_user.j2", explanation=jobs[j][0], example=it.shown)}]
            for j, it in flat])
    out: list[list[dict]] = [[] for _ in jobs]
    for (j, it), verdict in zip(flat, verdicts, strict=True):
        rec = dict(it.record)
        rec["prediction"], rec["probability"] = verdict["answer"], verdict["p1"]
        if rec["prediction"] is not None:
            rec["correct"] = rec["prediction"] == rec["activating"]
        out[j].append(rec)
    return out


def judge_many(backend: ChatBackend, messages: list) -> list[dict]:
    """{"p1": P(1) or None, "answer": bool or None} per prompt: the backend's `judge` where it has
    one, else its generated answer's digit."""
    judge = getattr(backend, "judge", None)
    if judge is not None:
        return judge(messages)
    answers = backend.complete_many(messages, max_tokens=4)
    return [{"p1": None, "answer": parse_digit(a.text)} for a in answers]


def metrics(records: list[dict]) -> dict:
    """Balanced accuracy, precision, recall, F1 over the records with a prediction; counts of all;
    the judge's answers (`judge_check`)."""
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
            "failed": len(records) - len(done), "judge": judge_check(records)}


# a judge's P(1) that moves less than this over all its examples does not depend on them
FLAT_P1 = 1e-3
SAME_P1 = "gives every example the same P(1)"  # it ignores its input, or cannot tell these examples apart
ONE_CLASS = "answers one class"


def judge_check(records: list[dict]) -> dict:
    """How the judge answered: counts of 1, 0 and no answer, the spread of P(1), and a flag —
    SAME_P1 when P(1) is the same for every example (a judge that ignores its input; its balanced
    accuracy and AUROC are 0.5 whatever the description), ONE_CLASS when every answer is the same
    though P(1) moves (balanced accuracy is 0.5 by construction; the AUROC may still mean something;
    a judge without probabilities that answers one class gets this flag too)."""
    answers = [r["prediction"] for r in records]
    ones, zeros = sum(a is True for a in answers), sum(a is False for a in answers)
    probs = [r["probability"] for r in records if r.get("probability") is not None]
    spread = (max(probs) - min(probs)) if probs else None
    flag = None
    if len(probs) >= 4 and spread < FLAT_P1:
        flag = SAME_P1
    elif ones + zeros >= 4 and min(ones, zeros) == 0:
        flag = ONE_CLASS
    return {"answered_1": ones, "answered_0": zeros, "unanswered": len(answers) - ones - zeros,
            "p1_mean": sum(probs) / len(probs) if probs else None, "p1_spread": spread, "flag": flag}


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


def versus_shuffled(own: dict[int, list[dict]], base: dict[int, list[dict]]) -> dict:
    """Whether the descriptions beat the shuffled baseline by more than the spread over units: per
    unit scored both ways (`own`: with its description; `base`: with another unit's), the paired
    difference of AUROC — of balanced accuracy when some unit has no AUROC (a judge without
    probabilities) — then `gain`, their mean, and `spread`, their standard deviation over units
    (n − 1). `beats` is gain > spread; None with fewer than two units (no spread to compare to).
    A pooled score can beat its baseline on the strength of one or two units; this asks whether the
    descriptions do so as a set."""
    import statistics

    units = sorted(set(own) & set(base))
    pairs = {u: (metrics(own[u]), metrics(base[u])) for u in units}
    measure = "auroc" if all(o["auroc"] is not None and b["auroc"] is not None for o, b in pairs.values()) \
        else "balanced_accuracy"
    diffs = [o[measure] - b[measure] for o, b in pairs.values()
             if o[measure] is not None and b[measure] is not None and o[measure] == o[measure] and b[measure] == b[measure]]
    gain = sum(diffs) / len(diffs) if diffs else None
    spread = statistics.stdev(diffs) if len(diffs) >= 2 else None
    return {"measure": measure, "units": len(diffs), "gain": gain, "spread": spread,
            "beats": None if spread is None else bool(gain > spread)}


def predictions_metrics(truth: list[bool], predicted: list[bool]) -> dict:
    """The same metrics for a baseline's predictions."""
    return metrics([{"activating": t, "prediction": p} for t, p in zip(truth, predicted, strict=True)])


def shuffled(explanations: dict[int, str]) -> dict[int, str]:
    """Each unit gets another unit's explanation (a rotation: nobody keeps its own)."""
    units = sorted(explanations)
    if len(units) < 2:
        return {}
    return {u: explanations[units[(i + 1) % len(units)]] for i, u in enumerate(units)}
