"""Sparse coders of MoE internals (SAE, transcoders, crosscoders, CLTs), their trainer and file formats."""
