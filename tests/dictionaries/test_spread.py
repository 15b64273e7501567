"""Layer spread of cross-layer dictionaries (dictionaries/spread.py) on planted decoders: CLT features
written to their own layer only have spread 1, those written equally to three layers spread 3; the
output scale is undone before shares are taken; a crosscoder's features likewise; dead features are
left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_planted_clt_spread_is_recovered_exactly():
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.spread import layer_spread

    S, D, Fl = 4, 8, 6
    clt = build_coder(CoderConfig(d_in=S * D, d_out=S * D, n_latents=S * Fl, n_sites=S, cross_layer=True,
                                  activation="relu"))
    with torch.no_grad():
        for i, w in enumerate(clt.W_dec):
            w.zero_()
            for f in range(Fl):
                w[f, 0, f % D] = 1.0  # every feature writes to its own layer
                if i <= 1 and f < 3:  # features 0–2 of layers 0 and 1 also write to the next two layers
                    w[f, 1, 0] = 1.0
                    w[f, 2, 1] = 1.0
    r = layer_spread(clt)
    assert r["histogram"] == {"1": S * Fl - 6, "2": 0, "3": 6, "4": 0} and r["features"] == S * Fl
    assert r["share_by_offset"][0] == pytest.approx(np.mean([1.0] * (S * Fl - 6) + [1 / 3] * 6), abs=1e-12)
    # the output scale of layer 2 doubles what the coder writes there, before it is undone: the shares
    # of features writing to layer 2 change, a feature's own-layer-only spread does not
    with torch.no_grad():
        clt.target_scale.view(S, D)[2] = 0.5  # out_2 = decoded / 0.5: twice the vector in the model's units
    r2 = layer_spread(clt, threshold=0.3)
    # layer 0 features 0–2: energies 1, 1, 4 (layer 2 doubled) → shares 1/6, 1/6, 2/3 → spread at 0.3 is 1
    # layer 1 features 0–2: layers 1, 2, 3 → energies 1, 4, 1 → spread 1 as well; at 0.1 both stay at 3
    assert r2["histogram"]["3"] == 0 and layer_spread(clt)["histogram"]["3"] == 6
    live = np.ones(S * Fl, dtype=bool)
    live[:3] = False  # the three spread features of layer 0 never fired
    assert layer_spread(clt, live)["histogram"]["3"] == 3


def test_crosscoder_spread_and_single_site_none():
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.spread import layer_spread

    S, D, F = 2, 4, 5
    cc = build_coder(CoderConfig(d_in=S * D, d_out=S * D, n_latents=F, n_sites=S, activation="relu"))
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0] = 1.0  # site 0 only
        cc.W_dec[1, D] = 1.0  # site 1 only
        cc.W_dec[2:, 0] = cc.W_dec[2:, D] = 1.0  # both
    assert layer_spread(cc)["histogram"] == {"1": 2, "2": 3}
    sae = build_coder(CoderConfig(d_in=D, n_latents=F, activation="relu"))
    assert layer_spread(sae) is None
