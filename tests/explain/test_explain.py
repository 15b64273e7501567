"""Explanations and scores with known answers: planted features explained by an oracle over a real
HTTP server that speaks the OpenAI protocol; shuffled explanations at chance; an always-yes scorer
at 0.5; retries, concurrency and the cache; delphi's own analysis reading our score files."""

from __future__ import annotations

import re

import numpy as np
import pytest

from deepseemoe.explain.backends import Cached, OpenAIChat, parse_digit
from deepseemoe.explain.explainer import Prompts, mark, parse_explanation
from deepseemoe.explain.pipeline import run_explain, run_score
from deepseemoe.explain.scorers import metrics
from deepseemoe.explain.units import Corpus
from deepseemoe.runs.explanations import ExplanationStore
from tests.explain.stub_server import Stub

FAMILIES = {0: ["cat", "dog", "horse", "mouse"], 1: ["red", "green", "blue", "yellow"],
            2: ["seven", "eleven", "twenty", "forty"]}
FILLER = ["the", "a", "of", "went", "quietly", "house", "river", "said", "and", "then", "over", "big"]


def planted(n_tokens: int = 6000, seed: int = 0) -> tuple[Corpus, np.ndarray]:
    """A word-level corpus; unit u fires (0.5–3) exactly on the words of family u."""
    rng = np.random.default_rng(seed)
    words = FILLER + [w for f in FAMILIES.values() for w in f]
    p = np.array([0.7 / len(FILLER)] * len(FILLER) + [0.3 / 12] * 12)
    ids = rng.choice(len(words), size=n_tokens, p=p)
    acts = np.zeros((n_tokens, len(FAMILIES)), np.float32)
    for u, fam in FAMILIES.items():
        hit = np.isin(ids, [words.index(w) for w in fam])
        acts[hit, u] = rng.uniform(0.5, 3.0, hit.sum())
    starts = np.arange(0, n_tokens + 1, 100)
    return Corpus(ids, starts, {i: " " + w for i, w in enumerate(words)}), acts


def test_marking_and_parsing_by_hand():
    assert mark([" a", " cat", " dog", " sat"], [0.0, 2.0, 1.0, 0.1]) == " a<< cat dog>> sat"
    assert parse_explanation("thinking...\n[EXPLANATION]: animal words") == "animal words"
    assert parse_explanation("no line") == "Explanation could not be parsed."
    assert parse_explanation("[EXPLANATION]: animal words\nThe dog said...") == "animal words"
    assert parse_explanation("[EXPLANATION]:\n\n  animal words\nmore") == "animal words"
    assert parse_digit("1") is True and parse_digit(" 0.") is False and parse_digit("[1]") is True
    assert parse_digit("Answer: 0") is False and parse_digit("yes") is None and parse_digit(None) is None
    assert parse_digit("10 of them") is None and parse_digit("0.5") is None  # numbers are not answers


def test_metrics_by_hand_and_an_always_yes_scorer_is_at_half():
    recs = [{"activating": a, "prediction": p} for a, p in [(1, 1), (1, 0), (0, 0), (0, 0), (0, 1), (1, None)]]
    m = metrics(recs)
    # TPR 1/2, TNR 2/3 → 7/12; precision 1/2, F1 1/2; one unanswered
    assert m["balanced_accuracy"] == pytest.approx(7 / 12) and m["f1"] == pytest.approx(0.5)
    assert (m["examples"], m["scored"], m["failed"]) == (6, 5, 1)
    yes = metrics([{"activating": a, "prediction": True} for a in [1, 0, 0, 1, 0]])
    assert yes["balanced_accuracy"] == 0.5 and yes["auroc"] is None
    # AUROC by hand: positives 0.9, 0.4; negatives 0.4, 0.1 → pairs won 1 + 1 + 0.5 + 1 = 3.5 of 4
    probs = [{"activating": a, "prediction": p > 0.5, "probability": p} for a, p in [(1, .9), (1, .4), (0, .4), (0, .1)]]
    assert metrics(probs)["auroc"] == pytest.approx(3.5 / 4)


def _explain_and_score(tmp_path, stub, scorers=("detection", "fuzz"), **kw):
    corpus, acts = planted()
    store = ExplanationStore(tmp_path / "store", "planted")
    chat = Cached(OpenAIChat(stub.url, "oracle", concurrency=4, backoff=0.01, **kw), tmp_path / "answers.sqlite")
    prompts = Prompts.load()
    got = run_explain(store, corpus, acts, [0, 1, 2], {}, chat, prompts, kind="feature", source={}, window=8)
    summary = run_score(store, chat, prompts, list(scorers))
    return got, summary, store, chat


def test_an_oracle_explains_planted_features_and_scores_near_one_while_shuffled_is_at_chance(tmp_path):
    with Stub() as stub:
        got, summary, store, _ = _explain_and_score(tmp_path, stub)
    for u, fam in FAMILIES.items():
        assert set(got[u].split()) == set(fam), got[u]  # the oracle names exactly the family
    for scorer in ("detection", "fuzz"):
        own, base = summary["scorers"][scorer]["explanation"], summary["scorers"][scorer]["shuffled_explanation"]
        assert own["balanced_accuracy"] > 0.95 and own["failed"] == 0, (scorer, own)
        assert abs(base["balanced_accuracy"] - 0.5) < 0.15, (scorer, base)
        assert own["examples"] >= 3 * 20
    # explained on one half, scored on the other: no scored window is one the explainer saw
    doc = store.examples()
    for u in doc["units"].values():
        shown = {"".join(e_["tokens"]) for e_ in u["train"]}
        scored = {"".join(e_["tokens"]) for e_ in u["test"] + u["not_active"]}
        assert not shown & scored


def test_verdict_from_top_logprobs_by_hand():
    import math

    from deepseemoe.explain.backends import Completion, _verdict

    top = [{"token": " 1", "logprob": math.log(0.6)}, {"token": "0", "logprob": math.log(0.2)},
           {"token": "1", "logprob": math.log(0.1)}, {"token": "The", "logprob": math.log(0.1)}]
    v = _verdict(Completion("1", top_logprobs=top))  # " 1" and "1" are one answer: P(1) = 0.7 / 0.9
    assert v["p1"] == pytest.approx(0.7 / 0.9) and v["answer"] is True
    assert _verdict(Completion("0", top_logprobs=[{"token": "0", "logprob": -0.1}])) == {"p1": 0.0, "answer": False}
    assert _verdict(Completion("1")) == {"p1": None, "answer": True}  # no log-probabilities: the digit
    assert _verdict(Completion(None, "HTTP 500")) == {"p1": None, "answer": None}


def test_each_example_is_judged_on_its_own_prompt_with_probabilities(tmp_path):
    """One prompt per example (no list, no example answer to copy), P(1) from the endpoint's
    log-probabilities: the oracle's AUROC is 1, the shuffled explanations' near chance, and the
    judge's answers are reported beside the scores without a flag."""
    with Stub() as stub:
        _, summary, store, _ = _explain_and_score(tmp_path, stub, scorers=("detection",))
        n = sum(len(u["test"]) + len(u["not_active"]) for u in store.examples()["units"].values())
        assert stub.answered == 3 + 2 * n  # 3 explanations, then each example once per explanation
    own, base = summary["scorers"]["detection"]["explanation"], summary["scorers"]["detection"]["shuffled_explanation"]
    assert own["auroc"] == pytest.approx(1.0) and abs(base["auroc"] - 0.5) < 0.2
    assert own["judge"]["flag"] is None and own["judge"]["answered_1"] > 0 and own["judge"]["answered_0"] > 0
    for records in store.scores("detection").values():
        assert all(r["probability"] in (pytest.approx(0.9), pytest.approx(0.1)) for r in records)


def test_a_judge_that_ignores_its_input_is_flagged(tmp_path, cli):
    with Stub(ignore_input=True) as stub:
        _, summary, _, _ = _explain_and_score(tmp_path, stub, scorers=("detection",))
    own = summary["scorers"]["detection"]["explanation"]
    assert own["judge"]["flag"] == "gives every example the same P(1)" and own["judge"]["p1_spread"] < 1e-6
    assert own["balanced_accuracy"] == 0.5 and own["auroc"] == 0.5


def test_a_judge_without_logprobs_is_scored_by_its_digits(tmp_path):
    with Stub(logprobs=False) as stub:
        _, summary, store, _ = _explain_and_score(tmp_path, stub, scorers=("detection",))
    own = summary["scorers"]["detection"]["explanation"]
    assert own["balanced_accuracy"] > 0.95 and own["failed"] == 0 and own["auroc"] is None
    assert all(r["probability"] is None for recs in store.scores("detection").values() for r in recs)


def test_an_always_yes_scorer_gets_balanced_accuracy_one_half(tmp_path):
    with Stub(always_yes=True) as stub:
        _, summary, _, _ = _explain_and_score(tmp_path, stub, scorers=("detection",))
    assert summary["scorers"]["detection"]["explanation"]["balanced_accuracy"] == 0.5
    assert summary["scorers"]["detection"]["explanation"]["judge"]["flag"] in ("gives every example the same P(1)", "answers one class")


@pytest.mark.parametrize("status", [429, 500])
def test_retries_concurrency_and_a_rerun_that_pays_nothing(tmp_path, status):
    with Stub(fail_first=status, delay=0.02) as stub:
        _, summary, _, _ = _explain_and_score(tmp_path, stub)
        assert stub.failed > 0 and summary["scorers"]["detection"]["explanation"]["failed"] == 0
        assert stub.max_in_flight > 1  # requests ran concurrently
        before = stub.requests
        _, again, _, chat2 = _explain_and_score(tmp_path, stub)
        assert stub.requests == before and chat2.misses == 0 and chat2.hits > 0
        assert again["scorers"] == summary["scorers"]


def test_delphis_own_analysis_reads_our_scores(tmp_path):
    from delphi.log.result_analysis import get_agg_metrics, load_data

    with Stub() as stub:
        _, summary, store, _ = _explain_and_score(tmp_path, stub)
    df = load_data(store.path / "scores", ["planted"])
    latent_df = df[0] if isinstance(df, tuple) else df
    agg = get_agg_metrics(latent_df, None)
    by = {row.score_type: row for row in agg.itertuples()} if hasattr(agg, "itertuples") else agg
    for scorer in ("detection", "fuzz"):
        assert by[scorer].accuracy == pytest.approx(summary["scorers"][scorer]["explanation"]["balanced_accuracy"])


def test_cli_explains_and_scores_features_and_experts_of_tiny_runs(tmp_path, cli, corpus_jsonl):
    """`explain` / `score` end to end on a training run and a routing run of a tiny OLMoE, through
    the OpenAI backend; `--find` searches the descriptions."""
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 12) + "\n")
    assert cli("train", "--model", "tiny:olmoe", "--data", data, "--kind", "sae", "--site", "block_in", "--layers",
               "1", "--out", tmp_path / "dicts", "--tokens", "2048", "--k", "8").code == 0
    assert cli("route", "tiny:olmoe", "--data", data, "--out", tmp_path / "route", "--max-tokens", "3000").code == 0
    with Stub() as stub:
        backend = ["--backend", "openai", "--url", stub.url, "--model", "oracle", "--cache", tmp_path / "a.sqlite"]
        r = cli("explain", tmp_path / "dicts", "--dictionary", "sae_block_in_1", "--features", "5", "--tokens", "2000",
                *backend)
        assert r.code == 0, r.err
        r = cli("score", tmp_path / "dicts", "--dictionary", "sae_block_in_1", *backend)
        assert r.code == 0, r.err
        assert "detection: balanced accuracy" in r.out and "shuffled explanations" in r.out
        r = cli("explain", tmp_path / "route", "--layer", "1", *backend)
        assert r.code == 0, r.err
        r = cli("score", tmp_path / "route", "--layer", "1", *backend)
        assert r.code == 0, r.err
        assert "routing: balanced accuracy" in r.out and "token identity" in r.out
    # the offline embedding judge scores the same descriptions; it cannot write them
    r = cli("score", tmp_path / "route", "--layer", "1", "--backend", "embedding")
    assert r.code == 0, r.err
    assert "routing: balanced accuracy" in r.out
    assert ExplanationStore(tmp_path / "route" / "explanations" / "layer1", "layer1.experts").summary()["backend"] == \
        "embedding:all-MiniLM-L6-v2"
    r = cli("explain", tmp_path / "route", "--layer", "1", "--backend", "embedding")
    assert r.code == 2 and r.error_lines and "cannot write them" in r.error_lines[0]
    store = ExplanationStore(tmp_path / "route" / "explanations" / "layer1", "layer1.experts")
    assert len(store.explanations()) == 8 and set(store.scores("routing")) == set(range(8))
    word = next(iter(store.explanations().values())).split()[0]
    r = cli("explain", tmp_path / "route", "--find", word)
    assert r.code == 0 and word in r.out
    r = cli("explain", tmp_path / "route", "--find", "zebra-words-nobody-wrote")
    assert r.code == 0 and "no description" in r.out and "zebra-words-nobody-wrote" in r.out
    # nothing explained yet: one line, before any model loads
    r = cli("score", tmp_path / "dicts", "--dictionary", "nope", "--backend", "openai", "--url", "http://x", "--model", "m")
    assert r.code == 2 and r.error_lines and "deepseemoe explain" in r.error_lines[0]


def test_expert_descriptions_beside_the_features_that_route_to_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepseemoe.explain.mapping import map_descriptions

    experts = ExplanationStore(tmp_path / "e", "layer1.experts")
    experts.save_explanations({0: "code", 1: "German"})
    features = ExplanationStore(tmp_path / "f", "sae")
    features.save_explanations({3: "def keyword", 5: "umlauts", 7: "brackets"})
    table = tmp_path / "fe.parquet"  # feature 9 is not explained; feature 7's count is too small
    pq.write_table(pa.table({"feature": [3, 7, 5, 9, 7, 3], "expert": [0, 0, 1, 1, 1, 1],
                             "count": [10, 10, 8, 50, 2, 4], "lift": [3.0, 2.0, 5.0, 9.0, 8.0, 0.5]}), table)
    got = {r.expert: r for r in map_descriptions(experts, features, pq.read_table(table).to_pydict())}
    assert got[0].description == "code" and got[0].features == [(3, 3.0, "def keyword"), (7, 2.0, "brackets")]
    assert got[1].features == [(5, 5.0, "umlauts")]  # lift 0.5 (avoids it) and count 2 are left out


def test_a_killed_explain_resumes_without_asking_again(tmp_path, cli, corpus_jsonl):
    """kill -9 in the middle of `explain`: the rerun asks only what was not answered yet."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 12) + "\n")
    assert cli("route", "tiny:olmoe", "--data", data, "--out", tmp_path / "route", "--max-tokens", "3000").code == 0
    with Stub(delay=0.4) as stub:
        args = [sys.executable, "-m", "deepseemoe.cli", "explain", str(tmp_path / "route"), "--layer", "1",
                "--backend", "openai", "--url", stub.url, "--model", "oracle", "--concurrency", "1",
                "--cache", str(tmp_path / "answers.sqlite")]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while stub.answered < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = stub.answered
        assert 3 <= answered < 8  # killed half-way through the 8 experts
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        # no prompt answered before the kill is asked again (the one the kill cut off may be); the
        # rerun asks the experts not reached yet, and the retries of junk answers, once each
        assert stub.requests - len(stub.seen) <= 1, (answered, stub.requests, len(stub.seen))
        assert stub.requests > answered
    store = ExplanationStore(tmp_path / "route" / "explanations" / "layer1", "layer1.experts")
    assert len(store.explanations()) == 8


def test_bad_input_and_failing_endpoints_get_one_line_and_leave_no_false_explanations(tmp_path, cli, corpus_jsonl):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 12) + "\n")
    assert cli("route", "tiny:olmoe", "--data", data, "--out", tmp_path / "route", "--max-tokens", "3000").code == 0
    route = tmp_path / "route"
    with Stub(always_status=401) as stub:  # every request refused: nothing may be saved as an explanation
        r = cli("explain", route, "--layer", "1", "--backend", "openai", "--url", stub.url, "--model", "m",
                "--cache", tmp_path / "a.sqlite")
        assert r.code == 2 and "answered none of 8 requests" in r.error_lines[0] and "401" in r.error_lines[0]
    assert not ExplanationStore(route / "explanations" / "layer1", "layer1.experts").explanations()
    for bad in (["--features", "abc"], ["--features", "-1"], ["--features", "0"]):
        r = cli("explain", tmp_path, "--dictionary", "d", *bad, "--backend", "openai", "--url", "http://x", "--model", "m")
        assert r.code == 2 and r.error_lines and "--features" in r.error_lines[0], (bad, r.err)
    (tmp_path / "adir").mkdir()
    r = cli("explain", route, "--layer", "1", "--backend", "openai", "--url", "http://x", "--model", "m",
            "--cache", tmp_path / "adir")
    assert r.code == 2 and r.error_lines and "--cache" in r.error_lines[0]
    # a new explain replaces the old set: no stale descriptions of units not explained this time
    store = ExplanationStore(route / "explanations" / "layer1", "layer1.experts")
    with Stub() as stub:
        backend = ["--backend", "openai", "--url", stub.url, "--model", "oracle", "--cache", tmp_path / "b.sqlite"]
        assert cli("explain", route, "--layer", "1", *backend).code == 0
        assert cli("score", route, "--layer", "1", *backend).code == 0
    store.save_explanations({99: "stale"})
    store.save_examples({"module": store.module, "units": {}})
    assert not store.explanations() and store.scores("routing") == {} and store.summary() is None


def test_a_rescore_with_fewer_scorers_replaces_the_scores_as_a_whole(tmp_path):
    with Stub() as stub:
        _, _, store, chat = _explain_and_score(tmp_path, stub, scorers=("detection", "fuzz"))
        assert store.scores("fuzz")
        summary = run_score(store, chat, Prompts.load(), ["detection"])
    assert set(summary["scorers"]) == {"detection"}
    assert not store.scores("fuzz") and not store.scores("fuzz_shuffled") and store.scores("detection")


def test_junk_explanations_are_retried_then_marked_undescribed_and_not_scored(tmp_path):
    """An explainer that echoes the prompt, repeats a token run or rambles is asked again with the
    examples reordered; a unit that never gets a usable answer is marked, not shown as a description,
    and not scored."""
    from deepseemoe.explain.backends import Completion
    from deepseemoe.explain.explainer import NO_DESCRIPTION, explain

    class Junk:
        """Junk to every first request; on a retry, a good answer for the animal unit only."""

        ident = "junk"

        def __init__(self):
            self.batches = []

        def complete_many(self, prompts, *, max_tokens, prefix=""):
            self.batches.append(len(prompts))
            out = []
            for m in prompts:
                marked = " ".join(re.findall(r"<<(.*?)>>", m[-1]["content"])).split()
                animal = any(w in marked for w in FAMILIES[0])
                if len(self.batches) > 1 and animal:
                    out.append(Completion(prefix + " animal words"))
                elif animal:
                    out.append(Completion(prefix + " <<<<<<<<"))
                else:
                    out.append(Completion(prefix + " The last line of your answer must be the explanation"))
            return out

    from deepseemoe.explain.units import Sampler

    corpus, acts = planted()
    sampler = Sampler(corpus, acts, window=8, seed=0)
    junk = Junk()
    got = explain(junk, Prompts.load(), {u: sampler.unit_examples(u).train for u in (0, 1)}, {}, retries=2)
    assert got == {0: "animal words", 1: NO_DESCRIPTION}
    assert junk.batches == [2, 2, 1]  # both retried once, the colour unit twice
    store = ExplanationStore(tmp_path / "store", "planted")
    with Stub() as stub:
        chat = Cached(OpenAIChat(stub.url, "oracle", concurrency=2, backoff=0.01), tmp_path / "a.sqlite")
        run_explain(store, corpus, acts, [0, 1], {}, chat, Prompts.load(), kind="feature", source={}, window=8)
        store.save_explanations({0: "cat dog", 1: NO_DESCRIPTION})
        summary = run_score(store, chat, Prompts.load(), ["detection"])
    assert summary["units"] == 1 and summary["undescribed"] == 1
    assert set(store.scores("detection")) == {0}


def test_local_judge_shares_prefixes_and_gives_the_plain_forwards_probabilities(tmp_path):
    """The local judge runs each batch's common prefix once and the rest of every prompt on its
    cache; P(1) must be what a plain forward of each whole prompt gives (softmax over the logits
    of "1" and "0" after the generation prompt), computed here one prompt at a time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deepseemoe.explain.backends import LocalChat
    from tests.conftest import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, pad_token_id=tok.pad_token_id))
    chat = LocalChat(lambda: (model, tok), "local:tiny", batch_size=3)
    system = "You judge whether the unit is active in the text. Answer 1 or 0." * 3
    prompts = [[{"role": "system", "content": system}, {"role": "user", "content": f"Explanation: {e}\n\nText: {t}"}]
               for e in ("the quick fox", "a lazy dog jumps") for t in ("one", "two words here", "and a much longer text "
                                                                         "than the others, to pad", "x")]
    got = chat.judge(prompts)
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    for m, verdict in zip(prompts, got, strict=True):
        ids = tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        p1 = float(torch.softmax(last[[zero, one]].float(), 0)[1])
        assert verdict["p1"] == pytest.approx(p1, abs=1e-5) and verdict["answer"] == (p1 > 0.5)


def test_junk_rules_by_hand():
    """The answers SmolLM2 gave in the demo, each refused for what it is; plain descriptions pass."""
    from deepseemoe.explain.explainer import unusable

    rules = Prompts.load().text("explainer_system.txt")
    junk = {
        "The last line of your answer must be the explanation, written as:": "cut off",
        "The last line of your answer must be the explanation.": "an echo of the prompt",
        "<<<<<<": "a token run",
        "[1] 1B1E6<<;>>NUSHU CHARACTER-1": "the delimiters",
        "[1] Spanish function words.": "the prompt's example numbering",
        "the word the the the": "a token run",
        "in the context of the domain of the domain of the domain": "a repeated phrase",
        "[Example 1]": "the prompt's example numbering",
        "It marks the activation of the": "cut off",
        "": "empty",
        "x" * 250: "too long",
        "1 2 3 4 5 6 7 8": "not words",
        "The unit is a part of the Mixture-of-Experts layer. It is a part of the Mixture-of-Experts layer.":
            "a repeated phrase",
        "The unit is active in the MoE layer 2, and it is the expert of the layer.": "the model's structure, not the data",
        'The unit is active in the domain of "I" and has 36 tokens routed to it.': "the model's structure, not the data",
    }
    for text, why in junk.items():
        assert unusable(text, rules) == why, text
    for text in ("Spanish function words (de, la, que)", "German nouns after articles", "dates and numbers",
                 "Python keywords such as def and return.", "Русский текст: предлоги"):
        assert unusable(text, rules) is None, text


def test_a_cut_off_last_sentence_is_trimmed():
    from deepseemoe.explain.explainer import trimmed

    assert trimmed("Spanish prose. The unit is active in the") == "Spanish prose."
    assert trimmed("Spanish prose.") == "Spanish prose." and trimmed("one fragment of") == "one fragment of"
