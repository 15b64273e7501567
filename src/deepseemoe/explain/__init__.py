"""Descriptions of features and experts written by an LLM, and scores that say how far to trust them.

    backends.py   chat backends (OpenAI-compatible HTTP, a local transformers model, the offline
                  SmolLM2 default) behind one cache keyed by the prompt
    units.py      the examples of a unit (a dictionary feature or an MoE expert): explaining and
                  scoring sets that never overlap, non-activating random and hard examples
    prompts/      the prompt templates (jinja2), readable and replaceable (`--prompts DIR`)
    explainer.py  prompt → `[EXPLANATION]:` answer
    scorers.py    detection, fuzzing and routing prediction, their metrics and baselines
"""
