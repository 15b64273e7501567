"""circuit-tracer's own ReplacementModel and attribution, run on a tiny OLMoE with transcoders we
exported: the hook names we write land on the activations our transcoders were trained on, and
its feature activations and reconstructions equal ours."""

from __future__ import annotations

import pytest
import torch
import yaml

from deepseemoe.capture.consumers import ActivationCollector
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.dictionaries.formats import CIRCUIT_TRACER_HOOKS, save_circuit_tracer
from deepseemoe.models.load import load_model


def _transcoder(d: int, layer: int, skip: bool):
    torch.manual_seed(10 + layer)
    return randomised(build_coder(CoderConfig(d_in=d, d_out=d, n_latents=48, activation="jumprelu", skip=skip)))


def randomised(coder):
    """A JumpReLU coder with random weights, thresholds and scales (seeded by the caller), in eval mode."""
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.3)
        coder.log_threshold.fill_(-2.0)
        coder.input_scale.uniform_(0.5, 2.0)
        coder.target_scale.uniform_(0.5, 1.5)
    return coder.eval()


def replacement_model(tiny_olmoe_dir, tmp_path, monkeypatch, skip: bool):
    """The tiny OLMoE with one random (skip-)transcoder per layer, exported in circuit-tracer's layout and
    loaded by its own code into its ReplacementModel: (our handle, our coders by layer, theirs)."""
    from circuit_tracer.transcoder import load_transcoder_set

    handle = load_model(str(tiny_olmoe_dir))
    D = handle.model.config.hidden_size
    coders = {layer: _transcoder(D, layer, skip) for layer in range(handle.num_layers)}
    folder = save_circuit_tracer(coders, tmp_path / "set", model_name="")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    transcoders = load_transcoder_set({i: str(folder / name) for i, name in enumerate(config["transcoders"])},
                                      scan="tiny-olmoe", feature_input_hook=config["feature_input_hook"],
                                      feature_output_hook=config["feature_output_hook"],
                                      device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    return handle, coders, circuit_tracer_model(tiny_olmoe_dir, handle, transcoders, monkeypatch)


def circuit_tracer_model(tiny_olmoe_dir, handle, transcoders, monkeypatch):
    """circuit-tracer's ReplacementModel of the tiny OLMoE with `transcoders` (a set, or a CLT) it loaded."""
    from circuit_tracer import ReplacementModel
    from transformer_lens import loading_from_pretrained

    # TransformerLens knows models by hub name only; lend it the local folder (nothing else changes)
    monkeypatch.setattr(loading_from_pretrained, "get_official_model_name", lambda name: name)
    return ReplacementModel.from_pretrained_and_transcoders(str(tiny_olmoe_dir), transcoders,
                                                            backend="transformerlens", hf_model=handle.model,
                                                            tokenizer=handle.tokenizer, device=torch.device("cpu"))


@pytest.mark.parametrize("skip", [False, True])
def test_replacement_model_and_attribution_on_our_transcoders(tmp_path, tiny_olmoe_dir, monkeypatch, skip):
    from circuit_tracer import attribute

    handle, coders, rm = replacement_model(tiny_olmoe_dir, tmp_path, monkeypatch, skip)
    ids = handle.tokenizer("def add(a, b): return a + b  # the sum", return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.tensor([[handle.tokenizer.bos_token_id]]), ids], 1)

    # ours: the block input / output at every layer, captured from the Hugging Face model
    sites = [Site(kind, layer) for layer in coders for kind in ("block_in", "block_out")]
    collector = ActivationCollector(sites)
    run_capture(handle, ids, [collector], exclude_bos=False)
    x = {layer: collector.chunks[Site("block_in", layer)][0].float() for layer in coders}
    y = {layer: collector.chunks[Site("block_out", layer)][0].float() for layer in coders}

    # theirs: what sits at the hooks we named, in their replacement model
    _, cache = rm.run_with_cache(ids, names_filter=lambda n: n.endswith((CIRCUIT_TRACER_HOOKS["block_in"],
                                                                         CIRCUIT_TRACER_HOOKS["block_out"])))
    with torch.no_grad():
        logits, acts = rm.get_activations(ids, sparse=False)
        seen = {}
        for layer, coder in coders.items():
            # the same activations (TransformerLens' and Hugging Face's float32 kernels differ by ~2e-5;
            # a wrong hook is off by O(1))
            seen[layer] = cache[f"blocks.{layer}.mlp.hook_in"][0]
            torch.testing.assert_close(seen[layer], x[layer], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_out"][0], y[layer], atol=1e-4, rtol=1e-4)
            ours = coder(seen[layer])
            # feature activations (circuit-tracer zeroes the BOS position) and reconstruction
            torch.testing.assert_close(acts[layer, 1:], ours.latents[1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rm.transcoders[layer](seen[layer]), ours.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], handle.model(ids).logits[0], atol=1e-4, rtol=1e-4)
    assert rm.skip_transcoder == skip

    graph = attribute(ids[0], rm, max_n_logits=3, batch_size=32, max_feature_nodes=64)
    active = graph.active_features  # [n, 3]: layer, position, feature
    assert len(active) > 0
    with torch.no_grad():
        for (layer, pos, feat), value in zip(active.tolist(), graph.activation_values.tolist(), strict=True):
            assert value == pytest.approx(float(coders[layer](seen[layer]).latents[pos, feat]), abs=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt_oss"])
def test_our_hook_names_are_the_ones_circuit_tracers_model_mapping_defines(model_type):
    """circuit-tracer's nnsight backend resolves hook names through its own model mapping: ours must
    be defined there, at the module whose output is our site."""
    import re

    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    handle = handle_from_model(tiny_model(model_type))
    mapping = get_mapping(type(handle.model).__name__)
    for kind, name in CIRCUIT_TRACER_HOOKS.items():
        assert name in mapping.feature_hook_mapping, f"{name} is not in circuit-tracer's {model_type} mapping"
        location, io = mapping.feature_hook_mapping[name]
        # "model.layers[{layer}].mlp.source.self_experts_0": the experts call inside the MoE block,
        # whose output is the block's routed output
        module = re.sub(r"\[(\d+)\]", r".\1", location.format(layer=1)).split(".source.")[0]
        assert io == "output" and module == handle.hook_names(Site(kind, 1))["hf"]
