"""Old module names, kept for one release so that scripts importing them keep working: importing one
gives the module it became (the same module object), with a DeprecationWarning naming it
(CHANGELOG.md, "Moved"). Installed by `import deepseemoe`; it answers only the names below, after
Python's own finders have found no file for them."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "deepseemoe.analysis.modules": "deepseemoe.graphs.modules",
    "deepseemoe.analysis.layout": "deepseemoe.graphs.layout",
    "deepseemoe.analysis.causal": "deepseemoe.causal.checks",
    "deepseemoe.analysis.removal": "deepseemoe.causal.removal",
    "deepseemoe.analysis.steering": "deepseemoe.causal.steering",
    "deepseemoe.analysis.figures": "deepseemoe.causal.figures",
    "deepseemoe.analysis.features": "deepseemoe.features.statistics",
    "deepseemoe.analysis.feature_map": "deepseemoe.features.map",
    "deepseemoe.analysis.feature_graph": "deepseemoe.features.graph",
    "deepseemoe.analysis.compare": "deepseemoe.compare.selectivity",
    "deepseemoe.analysis.routing_compare": "deepseemoe.compare.domains",
    "deepseemoe.analysis.sae_frontier": "deepseemoe.compare.frontier",
    "deepseemoe.analysis.wiring": "deepseemoe.compare.wiring",
    "deepseemoe.analysis.specialists": "deepseemoe.compare.specialists",
    "deepseemoe.analysis.sweep": "deepseemoe.compare.sweep",
    "deepseemoe.analysis.sweep_figures": "deepseemoe.compare.sweep_figures",
    "deepseemoe.analysis.seeds": "deepseemoe.measures",
    "deepseemoe.analysis.report_tables": "deepseemoe.report.tables",
    "deepseemoe.analysis.demo_stage": "deepseemoe.demo.analyses",
    "deepseemoe.dictionaries.run": "deepseemoe.dictionaries.training",
    "deepseemoe.dictionaries.spec": "deepseemoe.dictionaries.config",
    "deepseemoe.models.spec": "deepseemoe.models.handle",
    "deepseemoe.explore.store": "deepseemoe.explore.views",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} has moved to {MOVED[spec.name]}; import it from there (the old name goes in "
                      "the next release)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the module is the moved one, already executed


def install() -> None:
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())
