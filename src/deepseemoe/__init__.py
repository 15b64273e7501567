"""DeepSeeMoE: see inside Mixture-of-Experts language models.

Pipeline (one sub-package per stage): data → models (MoE adapter) → capture → routing /
dictionaries → features / interventions → compare → report. Heavy dependencies (torch,
transformers) are imported by the stages that use them, not here, so the CLI starts fast.
"""

__version__ = "0.1.0"
