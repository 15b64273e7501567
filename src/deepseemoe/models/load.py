"""Load a causal LM (hub id or local folder) and describe it as a `ModelHandle`.

Hub kernels stay off: `use_kernels=True` replaces whole MoE block forwards (e.g. MegaBlocks
for GPT-OSS) and silences the router/experts hooks this toolkit depends on.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "auto": "auto"}


def resolve_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise DeepSeeMoEError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return "auto" if key == "auto" else getattr(torch, _DTYPES[key])


def faster_cpu_dtype(*, timer=None) -> str:
    """"bfloat16" when this CPU multiplies bf16 matrices at least 1.5x faster than float32 (CPUs
    with AVX512-BF16 or AMX: SmolLM2's forward ran 2.7x faster on the project's 2-core machine),
    else "float32" (elsewhere bf16 is emulated and slower). Measured, not read off the CPU's flags
    (`_matmul_seconds`), once per process; `timer(dtype) -> seconds` replaces the clock in tests.
    For inference only: a figure measured in this dtype is a bf16 figure."""
    if timer is None:
        return _measured_faster_dtype()
    import torch

    return "bfloat16" if timer(torch.bfloat16) * 1.5 <= timer(torch.float32) else "float32"


@functools.cache
def _measured_faster_dtype() -> str:
    return faster_cpu_dtype(timer=_matmul_seconds)


def _matmul_seconds(dtype, repeats: int = 5) -> float:
    """The best of `repeats` products of the shape of a small model's MLP (256 tokens, 576 -> 1,536) in
    `dtype`: tens of milliseconds."""
    import time

    import torch

    a, b = torch.randn(256, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first product warms the kernels up
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def check_device(device: Any) -> Any:
    """`device` when this machine has it; one-line refusals for a misspelt or absent one."""
    import torch

    if device is None or isinstance(device, torch.device):
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeepSeeMoEError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepSeeMoEError(f"device {device!r} asks for CUDA, which this machine does not have; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeepSeeMoEError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return device


def load_model(name_or_path: str, *, dtype: Any = None, device: str | None = None, device_map: Any = None,
               trust_remote_code: bool = False, experts_implementation: str | None = None,
               revision: str | None = None, load_tokenizer: bool = True, weights: bool = True) -> ModelHandle:
    """Load a causal LM from the hub or a local folder and find its MoE (or dense) layers;
    `tiny:MODEL_TYPE` builds a tiny random-weight model of that type, with a byte-level tokenizer. `weights=False`
    builds the model from its config on the meta device, reading no weights: the structure alone,
    instantly even for a model of many GB (what `inspect` shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    if name_or_path.startswith("tiny:"):
        from deepseemoe.models.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(name_or_path.removeprefix("tiny:"), vocab_size=len(tokenizer))
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype not in (None, "auto"):
            model.to(torch_dtype)
        return handle_from_model(model.to(device or "cpu"), tokenizer, name=name_or_path)

    path = Path(name_or_path).expanduser()
    is_local = path.exists()
    if not is_local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise DeepSeeMoEError(f"model folder {name_or_path} does not exist; give an existing folder saved with "
                              "save_pretrained, or a hub id such as allenai/OLMoE-1B-7B-0924")
    source = str(path) if is_local else name_or_path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (the hub is unreachable here: use a local folder)" if offline or not is_local else ""
        raise DeepSeeMoEError(f"cannot load a model config from {name_or_path!r}{hint}: {str(exc).splitlines()[0]}"
                              ) from None
    except ValueError as exc:
        raise DeepSeeMoEError(f"{name_or_path}: {str(exc).splitlines()[0]} (pass --trust-remote-code only if you "
                              "trust this model's code)") from None

    mla_heads(config)
    if not weights:
        import torch

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return handle_from_model(model, None, name=name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    import pickle

    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, use_kernels=False, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise DeepSeeMoEError(f"{name_or_path} is a {type(config).__name__} model, not a causal language model; "
                                  "DeepSeeMoE reads decoder-only LMs (AutoModelForCausalLM)") from None
        raise
    except (pickle.UnpicklingError, SafetensorError, OSError, RuntimeError) as exc:
        # damaged, truncated or hostile weight files. Pickled weights (.bin) are read by transformers
        # with torch.load(weights_only=True), which refuses anything but tensors without running it.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeepSeeMoEError(f"cannot read the model weights of {name_or_path} ({type(exc).__name__}: {first[:200]}); "
                              "check the folder's weight files or download them again") from None
    if device is not None and device_map is None:
        model = model.to(device)
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError):
            tokenizer = None
    return handle_from_model(model, tokenizer, name=name_or_path)


def mla_heads(config) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3 and their kin) projects a key and a value for every
    head from its latent, so `num_key_value_heads` has no meaning there — but transformers still
    repeats the keys and values num_heads / num_key_value_heads times, which fails ("size of tensor a
    (4) must match … (8)") when a config gives fewer KV heads than heads. Set it to the head count:
    exactly the computation the weights define (no weight depends on it). True when it changed."""
    text = getattr(config, "get_text_config", lambda: config)()
    heads, kv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if getattr(text, "qk_rope_head_dim", None) and getattr(text, "kv_lora_rank", None) \
            and getattr(text, "model_type", "") != "mistral4" and kv not in (None, heads):
        text.num_key_value_heads = heads
        return True
    return False


def handle_from_model(model, tokenizer=None, *, name: str | None = None) -> ModelHandle:
    """Describe an in-memory model: decoder layers, MoE layers (or dense MLPs when it has none)."""
    from deepseemoe.models.registry import discover_dense_mlps, discover_moe_layers, find_decoder_layers

    model.eval()
    layers_path, layers = find_decoder_layers(model)
    moe = discover_moe_layers(model, layers_path, layers)
    dense = discover_dense_mlps(layers_path, layers)
    config = getattr(model, "config", None)
    return ModelHandle(model=model, tokenizer=tokenizer, name=name or type(model).__name__,
                       model_type=getattr(config, "model_type", "unknown"), layers_path=layers_path,
                       layers=layers, moe_layers=moe, dense_mlps=dense)
