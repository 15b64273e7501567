"""DeepSeeMoE: see inside Mixture-of-Experts language models.

Pipeline, one sub-package per stage, bottom to top:

    graphs        graph algorithms with no MoE knowledge: modules against rewirings, layouts
    runs          run directories: layouts, manifests, locks, atomic writes (the seam between stages)
    data, models, zoo      text sources and packing; loading models and the MoE adapter; the
                           small models the project trains itself
    capture       hooks: one forward feeding many consumers
    routing, interventions routing records and their statistics; the instruments: rewriting routing,
                           silencing units, the loss meter
    dictionaries  sparse coders, their trainer, formats, evaluation
    causal, features       what taking parts away does (causal checks, removal, steering); features ↔
                           experts (the map, the feature–expert graph)
    compare       MoE vs dense, trained vs carved, joint vs separate, the grid of dictionary designs
    attribution   attribution graphs of one prompt, through the router and the experts
    posttrain     LoRA post-training of an MoE by strategy (features as hints), and what it did to routing
    explain       descriptions of features and experts written by an LLM, and their scores
    report        the static report
    explore       the explorer: a live web app over run directories (`serve`)
    demo, commands, cli    the verbs (and `analysis`, the studies' old home: `moved` keeps its names one release)

Imports point down this list only (tests/test_import_direction.py fails on a backward import);
`errors`, `validate` and `progress` sit beneath everything. Heavy dependencies (torch, transformers) are
imported by the stages that use them, not here, so the CLI starts fast.
"""

__version__ = "0.1.0"

from deepseemoe import moved as _moved

_moved.install()

STAGES: tuple[frozenset[str], ...] = (
    frozenset({"errors", "validate", "progress", "distributed", "measures", "moved"}),
    frozenset({"graphs"}),
    frozenset({"runs"}),
    frozenset({"data", "models", "zoo"}),
    frozenset({"capture"}),
    frozenset({"routing", "interventions"}),
    frozenset({"dictionaries"}),
    frozenset({"causal", "features"}),
    frozenset({"compare"}),
    frozenset({"attribution", "posttrain"}),
    frozenset({"explain"}),
    frozenset({"report"}),
    frozenset({"explore"}),
    frozenset({"demo", "commands", "cli", "analysis"}),
)
