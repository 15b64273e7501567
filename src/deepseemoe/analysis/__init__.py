"""The old home of the studies, kept for one release: `deepseemoe.analysis.X` still imports, with a
DeprecationWarning naming the module X now lives in (CHANGELOG.md, "Moved")."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "modules": "deepseemoe.graphs.modules", "layout": "deepseemoe.graphs.layout",
    "causal": "deepseemoe.causal.checks", "removal": "deepseemoe.causal.removal",
    "steering": "deepseemoe.causal.steering", "figures": "deepseemoe.causal.figures",
    "features": "deepseemoe.features.statistics", "feature_map": "deepseemoe.features.map",
    "feature_graph": "deepseemoe.features.graph", "compare": "deepseemoe.compare.selectivity",
    "routing_compare": "deepseemoe.compare.domains", "sae_frontier": "deepseemoe.compare.frontier",
    "wiring": "deepseemoe.compare.wiring", "specialists": "deepseemoe.compare.specialists",
    "sweep": "deepseemoe.compare.sweep", "sweep_figures": "deepseemoe.compare.sweep_figures",
    "seeds": "deepseemoe.measures", "report_tables": "deepseemoe.report.tables",
    "demo_stage": "deepseemoe.demo.analyses",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `deepseemoe.analysis.X` with the module X moved to (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        parent, _, old = name.rpartition(".")
        return importlib.util.spec_from_loader(name, self) if parent == __name__ and old in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name.rpartition(".")[2]]
        warnings.warn(f"{spec.name} has moved to {new}; import it from there ({__name__} goes in the next "
                      "release)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module is the moved one, already executed


if not any(isinstance(f, _OldNames) for f in sys.meta_path):
    sys.meta_path.append(_OldNames())
