"""Graph algorithms with no MoE knowledge: modules (Louvain) against degree-preserving rewirings, and
ForceAtlas2 layouts."""
