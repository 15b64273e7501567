"""Analyses that pair routing observations with causal checks (issue: features ↔ experts, MoE vs dense)."""
