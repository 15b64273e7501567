"""Our files loaded by SAELens', sparsify's and circuit-tracer's own loaders reproduce our coders'
encodings and reconstructions; our own loaders read them back."""

from __future__ import annotations

import json

import pytest
import torch

from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.dictionaries.formats import (
    load_native,
    load_saelens,
    load_sparsify,
    save_circuit_tracer,
    save_native,
    save_saelens,
    save_sparsify,
)
from deepseemoe.errors import DeepSeeMoEError

D = 8


def trained_like(activation="topk", d_out=None, skip=False, F=24, k=3, **kw):
    """A coder with random weights, non-trivial biases, thresholds and scales, as training leaves it."""
    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=kw.pop("d_in", D), d_out=d_out, n_latents=F, activation=activation, k=k,
                                    skip=skip, **kw))
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.3)
        if coder.log_threshold is not None:
            coder.log_threshold.fill_(-1.5)
        if coder.threshold is not None:
            coder.threshold.uniform_(0.05, 0.3)
        coder.input_scale.uniform_(0.5, 2.0)
        coder.target_scale.copy_(coder.input_scale if not coder.cfg.is_transcoder else
                                 torch.rand_like(coder.target_scale) + 0.5)
    return coder.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(10, D, generator=torch.Generator().manual_seed(1)) * 2


SAELENS_CASES = [("topk", None, False), ("relu", None, False), ("jumprelu", None, False), ("batchtopk", None, False),
                 ("relu", D, False), ("relu", D, True), ("jumprelu", D, True), ("batchtopk", D, False),
                 ("jumprelu", 5, False)]  # the last: a router transcoder (d_out = experts)


@pytest.mark.parametrize(("activation", "d_out", "skip"), SAELENS_CASES)
def test_saelens_loads_our_files(tmp_path, x, activation, d_out, skip):
    import sae_lens

    coder = trained_like(activation, d_out=d_out, skip=skip)
    save_saelens(coder, tmp_path / "sae", hf_hook_name="model.layers.1.mlp", hf_hook_name_out="model.layers.1.mlp")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    with torch.no_grad():
        ours = coder(x)
        torch.testing.assert_close(sae.encode(x), ours.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), ours.out, atol=1e-5, rtol=1e-5)
    back = load_saelens(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(back(x).out, ours.out, atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["hf_hook_name"] == "model.layers.1.mlp"


@pytest.mark.parametrize(("d_out", "skip"), [(None, False), (D, False), (D, True)])
def test_sparsify_loads_our_files(tmp_path, x, d_out, skip):
    import sparsify

    coder = trained_like("topk", d_out=d_out, skip=skip)
    save_sparsify(coder, tmp_path / "run", "layers.1.mlp")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "run" / "layers.1.mlp", device="cpu")
    with torch.no_grad():
        ours = coder(x)
        enc = theirs.encode(x)
        dense = torch.zeros_like(ours.latents).scatter(1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(dense, ours.latents, atol=1e-5, rtol=1e-5)
        out = theirs.decode(enc.top_acts, enc.top_indices)
        if skip:
            out = out + x @ theirs.W_skip.mT
        torch.testing.assert_close(out, ours.out, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load_sparsify(tmp_path / "run" / "layers.1.mlp")(x).out, ours.out,
                                   atol=1e-5, rtol=1e-5)


def test_circuit_tracers_replacement_model_imports():
    # circuit-tracer's attribution entry point, not only its loaders, must be usable in the test
    # environment (tests/conftest.py restores the huggingface_hub flag it imports).
    from circuit_tracer import ReplacementModel, attribute

    assert callable(ReplacementModel.from_pretrained_and_transcoders) and callable(attribute)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_loads_our_transcoder_set(tmp_path, x, activation, skip):
    from circuit_tracer.transcoder import load_transcoder_set

    coders = {i: trained_like(activation, d_out=D, skip=skip) for i in range(2)}
    save_circuit_tracer(coders, tmp_path / "plt", model_name="tiny")
    import yaml

    config = yaml.safe_load((tmp_path / "plt" / "config.yaml").read_text())
    paths = {i: str(tmp_path / "plt" / name) for i, name in enumerate(config["transcoders"])}
    ts = load_transcoder_set(paths, scan="tiny", feature_input_hook=config["feature_input_hook"],
                             feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"),
                             lazy_encoder=False, lazy_decoder=False)
    with torch.no_grad():
        for i, coder in coders.items():
            ours = coder(x)
            tc = ts.transcoders[i]
            torch.testing.assert_close(tc.encode(x), ours.latents, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tc(x), ours.out, atol=1e-5, rtol=1e-5)
    assert ts.skip_connection == skip


def test_a_circuit_tracer_set_never_mixes_skip_and_plain_transcoders(tmp_path):
    # circuit-tracer takes the set's skip flag from layer 0: layer 1's skip term would be dropped
    with pytest.raises(DeepSeeMoEError, match="all skip transcoders or none"):
        save_circuit_tracer({0: trained_like("relu", d_out=D), 1: trained_like("relu", d_out=D, skip=True)},
                            tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_circuit_tracer_loads_our_cross_layer_transcoder(tmp_path, activation):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    S = 3
    clt = trained_like(activation, d_in=S * D, d_out=S * D, F=S * 6, n_sites=S, cross_layer=True)
    save_circuit_tracer(clt, tmp_path / "clt")
    theirs = load_clt(str(tmp_path / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = torch.randn(7, S * D, generator=torch.Generator().manual_seed(3))
    per_layer = x.view(7, S, D).transpose(0, 1)  # theirs: [layers, tokens, d_model]
    with torch.no_grad():
        ours = clt(x)
        torch.testing.assert_close(theirs.encode(per_layer), ours.latents.view(7, S, -1).transpose(0, 1),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(per_layer), ours.out.view(7, S, D).transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross_layer", [False, True])
def test_native_round_trip_and_checksum(tmp_path, x, cross_layer):
    coder = (trained_like("batchtopk", d_in=2 * D, d_out=2 * D, F=12, n_sites=2, cross_layer=True) if cross_layer
             else trained_like("topk", d_out=5, skip=True))
    save_native(coder, tmp_path / "c", meta={"source": "block_in@1"})
    back, meta = load_native(tmp_path / "c")
    xx = torch.randn(6, coder.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(back(xx).out, coder(xx).out)
    assert meta == {"source": "block_in@1"}
    weights = tmp_path / "c" / "coder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DeepSeeMoEError, match="checksum"):
        load_native(tmp_path / "c")


def test_formats_refuse_what_they_cannot_express(tmp_path):
    with pytest.raises(DeepSeeMoEError, match="no TopK transcoder"):
        save_saelens(trained_like("topk", d_out=D), tmp_path / "a", hf_hook_name="m")
    with pytest.raises(DeepSeeMoEError, match="TopK coders only"):
        save_sparsify(trained_like("jumprelu"), tmp_path / "b", "layers.0")
    with pytest.raises(DeepSeeMoEError, match="ReLU or JumpReLU"):
        save_circuit_tracer({0: trained_like("topk", d_out=D)}, tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing half-written
