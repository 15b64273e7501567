"""Training recipes of the offline demo models: an OLMoE and its dense twin (Llama).

The twin matches width, depth, attention and the active feed-forward parameters per token:
the MoE activates top_k experts of `expert_hidden` units each, the dense MLP has
top_k·expert_hidden units (only the MoE's router, E·D weights, has no counterpart).
Budgets are in optimizer steps, never wall-clock time, so a recipe gives the same models on
any machine. `router_aux_loss_coef=0.1` (not HF's 0.01): at 0.01 up to 10 of 16 experts die in
this regime (measured when the demo was planned).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from deepseemoe.errors import DeepSeeMoEError


@dataclass(frozen=True)
class Recipe:
    name: str
    vocab_size: int = 4096
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 16
    expert_hidden: int = 128
    top_k: int = 2
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.1
    seed: int = 0
    checkpoints: tuple[float, ...] = (0.01, 0.1, 0.4)  # fractions of `steps` kept for router saturation
    max_bytes_per_domain: int = 2_500_000
    tokenizer_bytes_per_domain: int = 1_500_000
    # "" (float), "ffn" (ternary experts / dense MLP) or "ffn+router": trained through a straight-through
    # estimator (models/ternary.py), the same data and budget as the float pair
    ternary: str = ""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {
    # 0.65M tokens per model, the two side by side on one core each: ~3 minutes on 2 cores (demo default;
    # measured 0.8-1.1 s/step for the MoE on one core of the project's machines). 450 steps until the demo
    # gained its carved MoE (2026-12-07), then 300 (cold run 12.5 minutes), 200 (10.0): the demo's
    # 10-minute budget, setup included, holds both with a margin at 160
    "demo": Recipe("demo", steps=160),
    # seconds: for tests and CI
    "tiny": Recipe("tiny", vocab_size=512, hidden=64, layers=2, heads=2, experts=8, expert_hidden=64, seq_len=64,
                   batch_size=8, steps=30, warmup=5, max_bytes_per_domain=120_000, tokenizer_bytes_per_domain=60_000),
    # for a GPU: a wider, deeper model on more tokens (~200M per model)
    "gpu": Recipe("gpu", vocab_size=16384, hidden=512, layers=8, heads=8, experts=32, expert_hidden=256, top_k=4,
                  seq_len=512, batch_size=64, steps=6000, lr=1e-3, warmup=300, max_bytes_per_domain=40_000_000,
                  tokenizer_bytes_per_domain=5_000_000),
}


# the ternary pairs: the float recipes with ternary experts, router and dense MLP (BitNet b1.58)
RECIPES.update({f"{name}-ternary": replace(r, name=f"{name}-ternary", ternary="ffn+router")
                for name, r in list(RECIPES.items())})


def ternary_parts(recipe: Recipe, moe: bool) -> tuple[str, ...]:
    """What a recipe makes ternary in the MoE (experts[, router]) or in the dense twin (mlp)."""
    if not recipe.ternary:
        return ()
    if recipe.ternary not in ("ffn", "ffn+router"):
        raise DeepSeeMoEError(f"recipe {recipe.name}: ternary={recipe.ternary!r} is not '', 'ffn' or 'ffn+router'")
    if not moe:
        return ("mlp",)
    return ("experts", "router") if recipe.ternary == "ffn+router" else ("experts",)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DeepSeeMoEError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def moe_config(recipe: Recipe, tokenizer):
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden, intermediate_size=recipe.expert_hidden,
                       num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                       num_key_value_heads=recipe.heads, num_experts=recipe.experts,
                       num_experts_per_tok=recipe.top_k, max_position_embeddings=recipe.seq_len,
                       router_aux_loss_coef=recipe.aux_loss_coef, norm_topk_prob=False, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def dense_config(recipe: Recipe, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden,
                       intermediate_size=recipe.top_k * recipe.expert_hidden, num_hidden_layers=recipe.layers,
                       num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
                       max_position_embeddings=recipe.seq_len, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
