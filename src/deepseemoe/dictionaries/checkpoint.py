"""Trainer checkpoints without pickle: tensors in safetensors, everything else as JSON.

A checkpoint is one `.safetensors` file. Its tensors are the leaves of the trainer's nested state
(coder weights, optimizer moments, shuffle buffers, RNG states as uint8 tensors), named by their
path in the state; the safetensors header's metadata holds the rest of the state as JSON under the
key "deepseemoe.state", with each tensor leaf replaced by {"tensor": NAME}. Reading it executes
nothing: safetensors parses a header and raw buffers, and json.loads builds only dicts, lists,
strings, numbers and booleans. (`torch.load` unpickles, which can run any code in the file: it is
never called on a checkpoint.)

JSON cannot tell an int key from a str key, nor a tuple from a list, and optimizer state has both
(`state[param_index]`, `betas`), so dicts with non-str keys and tuples are tagged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import atomic_path

STATE_KEY = "deepseemoe.state"
FORMAT_KEY = "deepseemoe.format"
FORMAT = "trainer-checkpoint/1"


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}}
        if all(isinstance(k, int) for k in obj):
            return {"int_dict": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
        raise TypeError(f"checkpoint state at {path} has keys that are neither all str nor all int")
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return {"list": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"value": obj}
    raise TypeError(f"checkpoint state at {path} holds a {type(obj).__name__}, which has no safe encoding")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (tag, body), = node.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in body.items()}
    if tag == "int_dict":
        return {int(k): _decode(v, tensors) for k, v in body}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if tag == "list":
        return [_decode(v, tensors) for v in body]
    if tag == "value":
        return body
    raise ValueError(f"unknown tag {tag!r}")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts/lists/tuples of tensors and plain values) atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "state", tensors)
    metadata = {FORMAT_KEY: FORMAT, STATE_KEY: json.dumps(tree)}
    with atomic_path(path) as tmp:
        save_file({k: t.cpu() for k, t in tensors.items()}, str(tmp), metadata=metadata)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, on the CPU; refuses anything else in one line."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get(FORMAT_KEY) != FORMAT:
                raise DeepSeeMoEError(f"{path} is not a DeepSeeMoE trainer checkpoint; start the run again "
                                      "without --resume")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return _decode(json.loads(metadata[STATE_KEY]), tensors)
    except DeepSeeMoEError:
        raise
    except Exception as exc:  # truncated, bit-flipped or foreign file: never a traceback
        raise DeepSeeMoEError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); delete it and "
                              "train again without --resume") from None
