"""Comparisons: MoE vs its dense twin, trained vs carved, joint vs separate dictionaries, and the grid
of dictionary designs (which layers, how many neighbours)."""
