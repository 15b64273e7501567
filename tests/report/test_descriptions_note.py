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
