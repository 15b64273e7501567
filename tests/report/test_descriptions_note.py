"""The report's note on weak offline models names who wrote the descriptions and who scored them."""

from __future__ import annotations

import jinja2


def _note(**m) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("deepseemoe.report", "templates"), autoescape=True)
    macro = env.get_template("components.html.j2").module.descriptions
    return str(macro({"scorers": [], "units": [], "undescribed": 0, "mapped": None, **m}))


def test_the_note_names_the_explainer_and_the_judge():
    smol = "local:SmolLM2-135M-Instruct.Q4_1"
    both = _note(weak=True, explained_by=smol, backend=smol)
    assert "Explained and scored by SmolLM2-135M-Instruct" in both
    judged = _note(weak=True, explained_by=smol, backend="embedding:all-MiniLM-L6-v2")
    assert "Explained by SmolLM2-135M-Instruct and scored by <code>embedding:all-MiniLM-L6-v2</code>" in judged
    assert "scored by SmolLM2" not in judged and "Explained and scored" not in judged
    assert "Scored by SmolLM2-135M-Instruct" in _note(weak=True, explained_by="openai:gpt", backend=smol)
    assert "weak model" not in _note(weak=False, explained_by="openai:gpt", backend="openai:gpt")


def test_the_report_says_plainly_whether_descriptions_beat_the_shuffled_baseline():
    def scorer(versus):
        return {"name": "routing", "own": 0.5, "f1": 0.6, "auroc": 0.5, "shuffled": 0.5, "shuffled_auroc": 0.45,
                "token": 0.7, "examples": 70, "failed": 0, "judge": None, "versus": versus}

    weak = _note(weak=False, explained_by="x", backend="x", scorers=[scorer(
        {"measure": "auroc", "units": 7, "gain": 0.06, "spread": 0.21, "beats": False})])
    assert "routing: these descriptions do not beat the shuffled baseline" in weak
    assert "AUROC +0.060 over it on average, within its spread over the 7 units (0.210)" in weak
    strong = _note(weak=False, explained_by="x", backend="x", scorers=[scorer(
        {"measure": "balanced_accuracy", "units": 5, "gain": 0.3, "spread": 0.1, "beats": True})])
    assert "routing: these descriptions beat the shuffled baseline" in strong and "do not beat" not in strong
    assert "balanced accuracy +0.300 over it" in strong
    few = _note(weak=False, explained_by="x", backend="x", scorers=[scorer(
        {"measure": "auroc", "units": 1, "gain": 0.3, "spread": None, "beats": None})])
    assert "too few units scored both ways (1)" in few
