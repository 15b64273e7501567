"""The old home of the studies, now in causal/, features/, compare/ and graphs/: `deepseemoe.analysis.X`
still imports for one release (`deepseemoe.moved`)."""
