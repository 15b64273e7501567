"""Tiny random-weight models of every MoE architecture in the installed `transformers`.

Used by the tests, the benchmarks and `deepseemoe inspect --tiny`: nothing is downloaded.
`moe_model_types()` enumerates MoE architectures from transformers itself, so that a new
release's additions appear (and fail loudly) instead of being silently skipped.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from typing import Any

# Sizes shared by all tiny configs; each config class keeps only the keys it knows.
_COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    max_position_embeddings=256, num_experts_per_tok=2, tie_word_embeddings=False,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# Per-architecture settings that the common sizes cannot express (traps in transformers 5.x:
# MLA head dims, hybrid models needing one full-attention layer, top-1-only routers, ...).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(norm_topk_prob=False),
    "qwen3_moe": dict(norm_topk_prob=True),
    "olmoe": dict(norm_topk_prob=False),
    "deepseek_v2": dict(topk_method="group_limited_greedy", routed_scaling_factor=1.5, head_dim=8),
    "deepseek_v3": dict(routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8),
    "granitemoeshared": dict(shared_intermediate_size=64),
    "granitemoehybrid": dict(shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
                             mamba_d_state=16, mamba_chunk_size=16, layer_types=["mamba", "attention"]),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=8, moe_top_k=2)),
    "jamba": dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                  use_mamba_kernels=False, mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2),
    "llama4_text": dict(intermediate_size=32, intermediate_size_mlp=128, interleave_moe_layer_step=1,
                        attention_chunk_size=64),
    "ernie4_5_moe": dict(moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_end_index=1,
                         moe_layer_interval=1),
    "hunyuan_v1_moe": dict(moe_topk=2, rope_theta=10000.0),
    "jetmoe": dict(kv_channels=16, num_key_value_heads=4),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "glm4_moe": dict(n_group=1, topk_group=1),
    "longcat_flash": dict(num_layers=2, moe_topk=2, zero_expert_num=2, expert_ffn_hidden_size=32,
                          ffn_hidden_size=128, head_dim=8),
    "beam": dict(mlp_layer_types=["dense", "sparse"], layer_types=["sliding_attention", "full_attention"]),
    "flint": dict(mlp_only_layers=[0], layer_types=["full_attention", "sliding_attention"]),
    "zaya": dict(num_experts_per_tok=1),
    "dots3_note_text": dict(num_key_value_heads=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "qwen4_exp_text": dict(indexer_budget=16, indexer_compress_ratio=4, indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=16),
    "glm4v_moe_text": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                                partial_rotary_factor=1.0)),
    "axk1": dict(head_dim=8),
    "bailing_hybrid": dict(num_experts_per_token=2, num_expert_group=2, topk_group=1),
    "gemma4_text": dict(enable_moe_block=True, top_k_experts=2, hidden_size_per_layer_input=0,
                        vocab_size_per_layer_input=128, global_head_dim=16,
                        layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}

_MOE_CLASS = re.compile(r"(Experts|SparseMoeBlock|MoE|Moe|MoeMLP|SparseMLP)$")


@cache
def moe_model_types() -> tuple[str, ...]:
    """Model types of the installed transformers that are text causal LMs with MoE layers.

    Criterion: registered for AutoModelForCausalLM or AutoModelForSeq2SeqLM, not a multimodal
    composite (those wrap a `*_text` model type that is enumerated itself), and the modeling
    module defines an MoE class (name ending in Experts/MoE/Moe/SparseMoeBlock/SparseMLP).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    found = []
    for model_type in sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)):
        module_name = model_type_to_module_name(model_type)
        try:
            module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        except Exception:  # optional dependency missing: not enumerable here
            continue
        config_class = CONFIG_MAPPING[model_type]
        if "text_config" in (getattr(config_class, "sub_configs", None) or {}):
            continue  # multimodal composite: its text model has a model type of its own
        if any(_MOE_CLASS.search(n) and isinstance(getattr(module, n), type) and "Output" not in n
               and "Config" not in n for n in dir(module)):
            found.append(model_type)
    return tuple(found)


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of `model_type` (hidden 64, 2 layers, 8 experts, top-2 where allowed)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        from deepseemoe.errors import DeepSeeMoEError

        raise DeepSeeMoEError(f"tiny:{model_type} names no model type of transformers; use tiny:MODEL_TYPE with a "
                              "type from README: Supported architectures, e.g. tiny:olmoe or tiny:mixtral")
    config_class = CONFIG_MAPPING[model_type]
    try:
        known = set(config_class().to_dict())
    except Exception:
        known = set(_COMMON)
    kwargs = {k: v for k, v in _COMMON.items() if k in known}
    kwargs.update(_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    config = config_class(**kwargs)
    fixes: dict[str, Any] = {}
    # MLA: rotary embeddings are built from head_dim but applied to the qk_rope slice.
    if getattr(config, "qk_rope_head_dim", None) and "head_dim" not in kwargs \
            and getattr(config, "head_dim", None) != config.qk_rope_head_dim:
        fixes["head_dim"] = config.qk_rope_head_dim
    from deepseemoe.models.load import mla_heads

    if mla_heads(config):  # the rule load_model applies to real configs (see there)
        fixes["num_key_value_heads"] = config.num_key_value_heads
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types and all(t == "linear_attention" for t in layer_types):
        fixes["layer_types"] = ["linear_attention", "full_attention"]
    if fixes:
        config = config_class(**{**kwargs, **fixes})
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides: Any):
    """A tiny random-weight causal LM of `model_type`, fp32, eval mode.

    Routing biases get small random values and all-zero routers random weights, so that bias
    paths are exercised and top-k has no ties.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if re.search(r"(e_score_correction_bias|expert_bias|balancing_biases)$", name):
                tensor.normal_(0, 0.05)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if re.search(r"(Router|Gate)$", type(module).__name__, re.I) and isinstance(weight, torch.Tensor) \
                    and weight.abs().sum() == 0:
                weight.normal_(0, 0.5)
    return model


TINY_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the pad/bos/eos ids of every tiny config


def tiny_tokenizer():
    """A byte-level tokenizer with no merges: the three specials, then one token per byte (259
    tokens). Any text round-trips, nothing is trained or downloaded — what `tiny:` models read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deepseemoe.data.token_text import _unicode_to_byte

    byte_of = _unicode_to_byte()  # byte-level BPE's printable stand-in of each byte → the byte
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet(), key=byte_of.__getitem__):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 20)
