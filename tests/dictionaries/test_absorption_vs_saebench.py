"""Feature absorption, our code against SAEBench's own (`sae-bench`'s FeatureAbsorptionCalculator,
the code behind its first-letter absorption scores), on the same inputs: our SAE saved in SAELens'
format and loaded by SAELens (SAEBench's SAE class), SAEBench fed the same activations through a
stand-in for the one thing it asks of a HookedTransformer (the cached residual at the word's
position), the same probe direction and main latent. Every token's full-absorption verdict and
absorption fraction must match ours (`dictionaries.absorption.token_absorption`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sae_bench.evals.absorption.feature_absorption_calculator")

D, F, N = 16, 48, 400


class _Activations:
    """What FeatureAbsorptionCalculator asks of its HookedTransformer: prompts of one token length, and
    the residual stream at `word_token_pos` (-2) of each prompt — here, the activation of its word."""

    def __init__(self, acts: dict[str, torch.Tensor]):
        self.acts = acts

    def to_tokens(self, text):
        return torch.zeros(1, 3, dtype=torch.long)

    def run_with_cache(self, prompts, names_filter):
        out = torch.zeros(len(prompts), 3, D)
        out[:, -2] = torch.stack([self.acts[p] for p in prompts])
        return None, {names_filter[0]: out}


def _sae(tmp_path):
    """A ReLU SAE with random weights whose latent 0 is the letter's main latent and latents 1–6 point
    partly along the letter (absorbers), saved in SAELens' format."""
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.formats import save_saelens

    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=D, d_out=None, n_latents=F, activation="relu", k=0))
    p = torch.zeros(D)
    p[0] = 1.0
    with torch.no_grad():
        coder.W_dec.normal_(0, 0.3)
        coder.W_enc.copy_(coder.W_dec.T if coder.W_enc.shape == (D, F) else coder.W_dec)
        coder.W_dec[0] = p
        coder.W_dec[1:7, 0] += torch.linspace(0.2, 1.2, 6)  # absorbers: their decoders lean on the letter
        coder.b_enc.fill_(-0.4)
        coder.b_dec.zero_()
    coder.eval()
    save_saelens(coder, tmp_path / "sae", hf_hook_name="model.layers.0")
    return coder, p


def test_every_tokens_absorption_matches_saebench(tmp_path):
    import sae_lens
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator

    from deepseemoe.dictionaries.absorption import token_absorption

    coder, p = _sae(tmp_path)
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0, 0.5, (N, D)), dtype=torch.float32)
    x[:, 0] += torch.tensor(rng.uniform(0.0, 1.5, N), dtype=torch.float32)  # the letter, at varying strength
    with torch.no_grad():
        latents = coder(x).latents
    decoder = coder.W_dec.detach().numpy()
    cos = decoder @ p.numpy() / np.linalg.norm(decoder, axis=1)
    ours_full, ours_fraction = token_absorption((x @ p).numpy(), latents.numpy(), cos, [0])

    words = [f"w{i}" for i in range(N)]
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    calc = FeatureAbsorptionCalculator(model=None, icl_word_list=[], shuffle_examples=False, batch_size=50)
    prompts = calc._build_prompts(words)
    calc.model = _Activations({pr.base: x[i] for i, pr in enumerate(prompts)})
    theirs = calc.calculate_absorption(sae, words, probe_direction=p, main_feature_ids=[0], layer=0,
                                       show_progress=False).word_results
    assert [r.word for r in theirs] == words
    their_full = np.array([r.is_full_absorption for r in theirs])
    their_fraction = np.array([r.absorption_fraction for r in theirs], dtype=float)
    # the inputs reach every branch: full absorptions, none, and fractions strictly between 0 and 1
    assert 0 < their_full.sum() < N and ((their_fraction > 0) & (their_fraction < 1)).any()
    np.testing.assert_array_equal(ours_full, their_full)
    np.testing.assert_allclose(ours_fraction, their_fraction, atol=1e-5)
