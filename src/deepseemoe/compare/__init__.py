"""MoE versus dense: the same pipeline on both, side by side."""
