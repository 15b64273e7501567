"""Dictionary evaluation: reconstruction, sparsity, spliced loss/KL, routing preservation."""
