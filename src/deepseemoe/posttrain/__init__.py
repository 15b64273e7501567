"""Post-training an MoE with LoRA, features as hints: which strategy gains on a target text at what
cost in forgetting and routing drift (`deepseemoe post-train`)."""
