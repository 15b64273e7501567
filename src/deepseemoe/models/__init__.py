"""Load a model and find its MoE layers: the adapter registry (sites, router math, selectors, expert recompute)."""
