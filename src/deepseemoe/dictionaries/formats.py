"""Write and read sparse coders: our own folder format and the files SAELens, sparsify and
circuit-tracer load with their own loaders (tests/dictionaries/test_formats.py loads every one).

Every writer first folds the input/target scales into the weights (`coder.folded()`), so the files
hold the plain affine maps; none of the formats has a place for them. A kind or activation a format
cannot express exactly (sparsify has no thresholds, SAELens has no TopK transcoder, circuit-tracer
only ReLU/JumpReLU) is refused with one line saying which format or activation to use instead.

Weight layouts (ours → theirs): W_enc [D, F] is SAELens' layout and the transpose of sparsify's
`encoder.weight` and circuit-tracer's `W_enc` [F, D]; W_dec [F, D_out] is the same in all three.
All writes are atomic: files go to a temporary folder that is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepseemoe.dictionaries.coder import Coder, CoderConfig, SparseCoder, build_coder
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.runs.atomic import read_json, read_safetensors
from deepseemoe.runs.dictionary import CODER_CONFIG, CODER_WEIGHTS, DictionaryRun
from deepseemoe.runs.lock import atomic_dir

NATIVE_WEIGHTS, NATIVE_CONFIG = CODER_WEIGHTS, CODER_CONFIG  # the layout is runs/dictionary.py's


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


# ---- native ---------------------------------------------------------------------------------------

def save_native(coder: Coder, path: str | Path, meta: dict | None = None) -> Path:
    """`config.json` (coder config, metadata, sha256 of the weights) + `coder.safetensors`; the
    scales are kept as tensors, so what loads back is the trained coder itself."""
    def write(tmp: Path) -> None:
        save_file({k: _cpu(v) for k, v in coder.state_dict().items()}, tmp / NATIVE_WEIGHTS)
        doc = {"format": "deepseemoe-coder/1", "coder": coder.cfg.to_dict(), "meta": meta or {},
               "sha256": _sha256(tmp / NATIVE_WEIGHTS)}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(doc, indent=2))

    return atomic_dir(Path(path), write)


def load_native(path: str | Path, device: str | torch.device = "cpu") -> tuple[Coder, dict]:
    from deepseemoe.models.load import check_device

    check_device(device)
    path = Path(path)
    if not (path / NATIVE_CONFIG).exists():
        raise DeepSeeMoEError(f"{path} is not a DeepSeeMoE coder folder (no {NATIVE_CONFIG}); "
                              "pass the folder written by `deepseemoe train`")
    doc = read_json(path / NATIVE_CONFIG, "train or copy the dictionary again")
    if not isinstance(doc, dict) or "sha256" not in doc or "coder" not in doc:
        raise DeepSeeMoEError(f"{path / NATIVE_CONFIG} is damaged (not a DeepSeeMoE coder config); train or copy "
                              "the dictionary again")
    if not (path / NATIVE_WEIGHTS).is_file():
        raise DeepSeeMoEError(f"{path / NATIVE_WEIGHTS} is missing; train or copy the dictionary again")
    if _sha256(path / NATIVE_WEIGHTS) != doc["sha256"]:
        raise DeepSeeMoEError(f"{path / NATIVE_WEIGHTS} does not match its checksum; the file is damaged, "
                              "train or copy it again")
    coder = build_coder(CoderConfig(**doc["coder"]), device=device)
    fix = "train or copy the dictionary again"
    try:
        coder.load_state_dict(read_safetensors(path / NATIVE_WEIGHTS, fix, str(device)))
    except RuntimeError as exc:  # tensors of other names or shapes than its config says
        raise DeepSeeMoEError(f"{path / NATIVE_WEIGHTS} does not hold the coder its config describes "
                              f"({str(exc).splitlines()[0]}); {fix}") from None
    return coder.eval(), doc["meta"]


def load_run_dictionary(run_dir: str | Path, name: str, device: str | torch.device = "cpu") -> tuple[Coder, dict]:
    """The coder `name` of a training run's dictionaries/ folder."""
    return load_native(DictionaryRun.open(run_dir).existing_coder(name), device=device)


# ---- SAELens --------------------------------------------------------------------------------------

def saelens_architecture(cfg: CoderConfig) -> str:
    if cfg.n_sites > 1:
        raise DeepSeeMoEError("SAELens has no crosscoder or cross-layer transcoder; save it in our format "
                              "(or circuit-tracer's, for a CLT)")
    thresholded = cfg.activation in ("jumprelu", "batchtopk")
    if not cfg.is_transcoder:
        return {"topk": "topk", "relu": "standard"}.get(cfg.activation, "jumprelu")
    if cfg.activation == "topk":
        raise DeepSeeMoEError("SAELens has no TopK transcoder; train it with --activation batchtopk (saved as "
                              "JumpReLU) or save it in sparsify's format")
    base = "skip_transcoder" if cfg.skip else "transcoder"
    return f"jumprelu_{base}" if thresholded else base


def _sae_lens_version() -> str:
    """The installed SAELens' version (the files are written for it), else the 6.x layout's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return "6.0.0"


def save_saelens(coder: Coder, path: str | Path, *, hf_hook_name: str, hook_name: str = "",
                 hf_hook_name_out: str = "", hook_name_out: str = "", model_name: str = "",
                 context_size: int = 0, sparsity: torch.Tensor | None = None) -> Path:
    """`cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`: log10 firing frequency)."""
    cfg = coder.cfg
    arch = saelens_architecture(cfg)
    c = coder.folded()
    meta = {"model_name": model_name, "hook_name": hook_name or hf_hook_name, "hf_hook_name": hf_hook_name,
            "context_size": context_size, "prepend_bos": True, "model_class_name": "AutoModelForCausalLM",
            "sae_lens_version": _sae_lens_version(), "sae_lens_training_version": "deepseemoe"}
    doc = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": not cfg.is_transcoder, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    if arch == "topk":
        doc.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if cfg.is_transcoder:
        doc["d_out"] = cfg.out_dim
        meta.update(hook_name_out=hook_name_out or hf_hook_name_out, hf_hook_name_out=hf_hook_name_out)
    tensors = {"W_enc": _cpu(c.W_enc), "b_enc": _cpu(c.b_enc), "W_dec": _cpu(c.W_dec), "b_dec": _cpu(c.b_dec)}
    if c.thresholds is not None:
        tensors["threshold"] = _cpu(c.thresholds)
    if cfg.skip:
        tensors["W_skip"] = _cpu(c.W_skip)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "sae_weights.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(doc, indent=2))
        if sparsity is not None:
            save_file({"sparsity": _cpu(sparsity)}, tmp / "sparsity.safetensors")

    return atomic_dir(Path(path), write)


# ---- sparsify -------------------------------------------------------------------------------------

def check_sparsify(cfg: CoderConfig) -> None:
    if cfg.n_sites > 1 or cfg.activation != "topk":
        raise DeepSeeMoEError(f"sparsify stores single-site TopK coders only (this one is {cfg.kind}, "
                              f"{cfg.activation}); save it for SAELens or circuit-tracer instead")
    if cfg.is_transcoder and cfg.out_dim != cfg.d_in:
        raise DeepSeeMoEError("sparsify transcoders write back to the input width; a router transcoder "
                              f"(d_out={cfg.out_dim}) goes to SAELens or our format")


def save_sparsify(coder: Coder, run_dir: str | Path, hookpoint: str) -> Path:
    """`<run_dir>/<hookpoint>/{cfg.json, sae.safetensors}`; hookpoint is relative to the base model
    (e.g. `layers.3` for a residual SAE, `layers.3.mlp` for a block transcoder)."""
    cfg = coder.cfg
    check_sparsify(cfg)
    c = coder.folded()
    doc = {"activation": "topk", "expansion_factor": cfg.n_latents // cfg.d_in, "normalize_decoder": True,
           "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
           "transcode": cfg.is_transcoder, "d_in": cfg.d_in}
    tensors = {"encoder.weight": _cpu(c.W_enc.T), "encoder.bias": _cpu(c.b_enc), "W_dec": _cpu(c.W_dec),
               "b_dec": _cpu(c.b_dec)}
    if cfg.skip:
        tensors["W_skip"] = _cpu(c.W_skip)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "sae.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(doc, indent=2))

    return atomic_dir(Path(run_dir) / hookpoint, write)


# ---- circuit-tracer -------------------------------------------------------------------------------

# circuit-tracer's names for the MLP/MoE block's input (after the pre-MLP norm) and output, which
# our transcoders read and write. Its TransformerLens backend wraps every block's MLP in a
# ReplacementMLP carrying exactly these two hooks, so they resolve for any architecture
# TransformerLens converts (OLMoE and Mixtral included); its nnsight backend's model mapping defines
# both for LlamaForCausalLM, Qwen3ForCausalLM and GptOssForCausalLM at the same two places
# (tests/dictionaries/test_circuit_tracer_e2e.py reads that mapping). "ln2.hook_normalized" /
# "hook_mlp_out", the older pair, name other places in the nnsight mapping of Gemma models (after
# the post-feedforward norm) and are missing from it for Llama-like ones.
CIRCUIT_TRACER_HOOKS = {"block_in": "mlp.hook_in", "block_out": "mlp.hook_out"}

def check_circuit_tracer(cfg: CoderConfig) -> None:
    if not cfg.is_transcoder:
        raise DeepSeeMoEError("circuit-tracer holds transcoders and CLTs, not SAEs or crosscoders")
    if cfg.activation == "topk":
        raise DeepSeeMoEError("circuit-tracer transcoders are ReLU or JumpReLU; train with --activation "
                              "batchtopk (its threshold is saved), jumprelu or relu")
    if cfg.out_dim != cfg.d_in:
        raise DeepSeeMoEError("circuit-tracer transcoders read and write the model width; "
                              f"d_in={cfg.d_in} ≠ d_out={cfg.out_dim}")


def save_circuit_tracer(coders: dict[int, Coder] | Coder, path: str | Path, *, model_name: str = "",
                        feature_input_hook: str = CIRCUIT_TRACER_HOOKS["block_in"],
                        feature_output_hook: str = CIRCUIT_TRACER_HOOKS["block_out"]) -> Path:
    """A per-layer transcoder set (dict layer → transcoder; layers 0..L-1 all present, all with a
    skip connection or none: circuit-tracer reads one skip flag for the set, from layer 0) as
    `layer_{i}.safetensors`, or a cross-layer transcoder as `W_enc_{i}` / `W_dec_{i}` files, each
    with a `config.yaml` naming the hooks. The set's `transcoders` list names the files relative to
    the folder: load it locally with `load_transcoder_set({i: FOLDER / name, ...}, ...)`, or
    rewrite them as hf:// addresses after uploading."""
    import yaml

    if isinstance(coders, dict):
        if sorted(coders) != list(range(len(coders))):
            raise DeepSeeMoEError(f"circuit-tracer needs a transcoder for every layer 0..L-1; got {sorted(coders)}")
        for c in coders.values():
            if c.cfg.cross_layer or not c.cfg.is_transcoder:
                raise DeepSeeMoEError("a circuit-tracer transcoder set holds single-layer transcoders")
            check_circuit_tracer(c.cfg)
        if len({c.cfg.skip for c in coders.values()}) > 1:
            raise DeepSeeMoEError("a circuit-tracer transcoder set is all skip transcoders or none (it reads one "
                                  "skip flag, from layer 0, and would drop the others' skip term); export them "
                                  "as separate sets or train one kind")
        folded = {i: c.folded() for i, c in coders.items()}
        files = {}
        for i, c in folded.items():
            t = {"W_enc": _cpu(c.W_enc.T), "b_enc": _cpu(c.b_enc), "W_dec": _cpu(c.W_dec), "b_dec": _cpu(c.b_dec)}
            if c.thresholds is not None:
                t["activation_function.threshold"] = _cpu(c.thresholds)
            if c.cfg.skip:
                t["W_skip"] = _cpu(c.W_skip)
            files[f"layer_{i}.safetensors"] = t
        config = {"model_kind": "transcoder_set", "model_name": model_name, "feature_input_hook": feature_input_hook,
                  "feature_output_hook": feature_output_hook, "transcoders": sorted(files, key=lambda n: int(n[6:-12]))}
    else:
        c = coders.folded()
        if not c.cfg.cross_layer:
            raise DeepSeeMoEError("pass a dict {layer: transcoder} for a per-layer set, or a cross-layer transcoder")
        check_circuit_tracer(c.cfg)
        S = c.cfg.n_sites
        D = c.cfg.out_dim // S
        b_dec = c.b_dec.view(S, D)
        thr = c.thresholds.view(S, -1) if c.thresholds is not None else None
        files = {}
        for i in range(S):
            enc = {f"W_enc_{i}": _cpu(c.W_enc[i].T), f"b_enc_{i}": _cpu(c.b_enc[i]), f"b_dec_{i}": _cpu(b_dec[i])}
            if thr is not None:
                enc[f"threshold_{i}"] = _cpu(thr[i])
            files[f"W_enc_{i}.safetensors"] = enc
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": _cpu(c.W_dec[i])}
        config = {"model_kind": "cross_layer_transcoder", "model_name": model_name,
                  "feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook}

    def write(tmp: Path) -> None:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    return atomic_dir(Path(path), write)


# ---- reading other tools' files -------------------------------------------------------------------

def load_saelens(path: str | Path) -> SparseCoder:
    """A SAELens folder (topk, standard, jumprelu and the transcoder architectures) as our coder."""
    path = Path(path)
    doc = read_json(path / "cfg.json", "give a folder written by that tool, with its cfg.json whole")
    arch = doc.get("architecture", "standard")
    act = {"topk": "topk", "standard": "relu", "transcoder": "relu", "skip_transcoder": "relu"}.get(arch, "jumprelu")
    if arch not in ("topk", "standard", "jumprelu", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                    "jumprelu_skip_transcoder"):
        raise DeepSeeMoEError(f"SAELens architecture {arch!r} has no DeepSeeMoE equivalent yet")
    if doc.get("normalize_activations", "none") != "none" or doc.get("rescale_acts_by_decoder_norm"):
        raise DeepSeeMoEError(f"{path}: activation normalisation / decoder-norm rescaling is not supported; "
                              "fold it into the weights with SAELens first")
    t = read_safetensors(path / "sae_weights.safetensors", "give a folder written by SAELens, with its weights whole")
    transcoder = "transcoder" in arch
    cfg = CoderConfig(d_in=doc["d_in"], d_out=doc.get("d_out", doc["d_in"]) if transcoder else None,
                      n_latents=doc["d_sae"], activation=act, k=doc.get("k", 1), skip="skip" in arch)
    coder = SparseCoder(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if cfg.skip else ()):
            getattr(coder, name).copy_(t[name])
        if act == "jumprelu":
            coder.log_threshold.copy_(t["threshold"].clamp_min(1e-12).log())
    if not transcoder and not doc.get("apply_b_dec_to_input", True):
        raise DeepSeeMoEError(f"{path}: an SAE without apply_b_dec_to_input is not supported")
    return coder.eval()


def load_sparsify(path: str | Path) -> SparseCoder:
    """One sparsify hookpoint folder (`cfg.json` + `sae.safetensors`, TopK) as our coder."""
    path = Path(path)
    doc = read_json(path / "cfg.json", "give a folder written by that tool, with its cfg.json whole")
    if doc.get("activation", "topk") != "topk":
        raise DeepSeeMoEError(f"{path}: sparsify activation {doc['activation']!r} is not supported; only topk")
    t = read_safetensors(path / "sae.safetensors", "give a folder written by sparsify, with its weights whole")
    M, D = t["encoder.weight"].shape
    cfg = CoderConfig(d_in=D, d_out=D if doc.get("transcode") else None, n_latents=M, activation="topk",
                      k=doc["k"], skip=bool(doc.get("skip_connection")))
    coder = SparseCoder(cfg)
    with torch.no_grad():
        coder.W_enc.copy_(t["encoder.weight"].T)
        coder.b_enc.copy_(t["encoder.bias"])
        coder.W_dec.copy_(t["W_dec"])
        coder.b_dec.copy_(t["b_dec"])
        if cfg.skip:
            coder.W_skip.copy_(t["W_skip"])
    return coder.eval()
