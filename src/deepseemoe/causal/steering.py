"""Feature ablation and steering through a dictionary spliced at its site, keeping the SAE's error:

    x' = x + (scale − 1) · f_i(x) · d_i        (scale 0: ablate feature i; 2: double it)

on the kept tokens of an SAE's site (decoder-layer input/output or MoE block input/output), with
the scales folded so d_i lives in the model's units. Reported against the clean model on the same
tokens: ΔCE and KL (nats/token), and for every MoE layer at or after the site the share of tokens
whose chosen expert set changed — over all tokens and over the tokens where the feature fired.

Shapes: site activations [T, D]; latents [T, F]; expert ids [T, K].
"""

from __future__ import annotations

import torch

from deepseemoe.capture.core import Site
from deepseemoe.data.tokens import token_domains
from deepseemoe.dictionaries.coder import Coder
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.interventions.loss import LossMeter
from deepseemoe.interventions.sites import REWRITABLE, rewrite_site, routing_hooks, watch_routing
from deepseemoe.models.handle import ModelHandle


class FeatureEdit:
    """Context manager: hooks that apply x' = x + (scale − 1)·Σ_i f_i(x)·d_i at the site (one feature,
    or a set of them), and record the routing of the MoE layers at or after it and where a feature fired."""

    def __init__(self, handle: ModelHandle, coder: Coder, site: Site, feature: int | list[int], scale: float):
        if site.kind not in REWRITABLE:
            raise DeepSeeMoEError(f"feature edits need an SAE on {', '.join(REWRITABLE)}; this one reads {site.kind}")
        if coder.cfg.is_transcoder or coder.cfg.n_sites > 1:
            raise DeepSeeMoEError("feature edits take a single-site SAE (its decoder writes the site it reads)")
        features = [feature] if isinstance(feature, int) else list(feature)
        bad = [f for f in features if not 0 <= f < coder.cfg.n_latents]
        if bad or not features:
            raise DeepSeeMoEError(f"feature {bad[0] if bad else '(none)'} does not exist; the dictionary has "
                                  f"0..{coder.cfg.n_latents - 1}")
        self.handle, self.site, self.scale = handle, site, scale
        self.features = torch.tensor(features, dtype=torch.long)
        self.coder = coder.folded()
        self.hooks: list = []
        self.keep: torch.Tensor | None = None
        self.fired: torch.Tensor | None = None
        self.fired_count = 0  # tokens where a feature fired, over every forward while entered
        self.routing: dict[int, list[torch.Tensor]] = {}

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        c = self.coder
        x = flat.to(c.b_dec.device, torch.float32)
        idx = self.features.to(x.device)
        f = c.encode(x)[:, idx]  # [T, n]
        if self.keep is not None:
            f = f * self.keep.to(f.device)[:, None]
        self.fired = (f > 0).any(1).cpu()
        self.fired_count += int(self.fired.sum())
        delta = (self.scale - 1.0) * f @ c.W_dec[idx]
        return (x + delta).to(flat.dtype).view_as(h)

    def __enter__(self):
        self.routing = {}
        self.hooks = [rewrite_site(self.handle, self.site, self._edit)]
        first = self.site.layer + (1 if self.site.kind.endswith("_out") else 0)
        self.hooks += routing_hooks(self.handle, [la for la in sorted(self.handle.moe_layers) if la >= first],
                                    self.routing)
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def expert_sets_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] True where the expert sets differ (order ignored)."""
    return ~(a.sort(-1).values == b.sort(-1).values).all(-1)


@torch.no_grad()
def edit_feature(handle: ModelHandle, coder: Coder, site: Site, batches: list, feature: int,
                 scale: float = 0.0, progress: bool = False) -> dict:
    with watch_routing(handle) as clean_calls:  # the clean pass of the meter gives the clean routing
        meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
    device = next(handle.model.parameters()).device
    counts: dict[int, list[float]] = {}
    loss = {"delta_ce": 0.0, "kl": 0.0}
    fired_total = 0
    edit = FeatureEdit(handle, coder, site, feature, scale)
    from deepseemoe.progress import track

    for i, b in track(list(enumerate(batches)), f"feature {feature} ×{scale:g}", disable=not progress,
                      unit="batches"):
        keep = b.keep.to(device)
        edit.keep = keep
        res = meter.measure(lambda: edit, only=[i])
        n = int(meter.valid[i].sum())
        loss["delta_ce"] += res["delta_ce"] * n
        loss["kl"] += res["kl"] * n
        fired = edit.fired & keep.cpu()
        fired_total += int(fired.sum())
        for layer, calls in edit.routing.items():
            ch = expert_sets_differ(clean_calls[layer][i], calls[-1]).cpu()
            c = counts.setdefault(layer, [0.0, 0.0, 0.0])
            c[0] += float(ch[keep.cpu()].sum())
            c[1] += float(ch[fired].sum())
            c[2] += int(keep.sum())
    n_all = sum(int(v.sum()) for v in meter.valid)
    return {"feature": feature, "scale": scale, "site": [site.kind, site.layer], "fired_tokens": fired_total,
            "delta_ce": loss["delta_ce"] / max(n_all, 1), "kl": loss["kl"] / max(n_all, 1),
            "routing_changed": {str(la): {"all_tokens": c[0] / max(c[2], 1),
                                          "where_fired": c[1] / fired_total if fired_total else float("nan")}
                                for la, c in sorted(counts.items())}}
