"""The loss meter: next-token cross-entropy of a model on held-out batches, clean and under an
intervention, overall and per domain, with KL(clean ‖ intervened).

Which predictions count: the prediction made at position t (reading token t, predicting t+1)
counts when both tokens are real text of the *same* document, and belongs to that document's
domain. Packing lays documents end to end, so the prediction "last token of document a → the
BOS that opens document b" reads `a` and predicts a token the packer inserted; it is left out of
every mean (overall and per domain), and no prediction is ever labelled by the document it
predicts. Attention still sees earlier documents of the same context, as in training.

Shapes: input ids [B, S]; per-token log-probs [B, S-1, V]; per-token losses [B, S-1].
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from deepseemoe.data.tokens import counted_predictions
from deepseemoe.models.handle import ModelHandle


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class LossMeter:
    """Clean per-token log-probs of every batch, then ΔCE / KL of interventions on the same batches."""

    def __init__(self, handle: ModelHandle, batches: list, domains: list[list[str]]):
        """`domains[i]` labels batch i's predictions [B·(S-1)] (see `token_domains`); only
        predictions within one document count (module docstring)."""
        self.handle, self.batches, self.domains = handle, batches, domains
        self.device = next(handle.model.parameters()).device
        self.clean_logp: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.clean_ce: list[torch.Tensor] = []
        self.domain_masks: list[dict[str, torch.Tensor]] = []
        for b, dom in zip(batches, domains, strict=True):
            logp, ce = self._run(b)
            valid = counted_predictions(b).to(ce.device)
            self.clean_logp.append(logp)
            self.clean_ce.append(ce)
            self.valid.append(valid)
            labels = np.array(dom).reshape(valid.shape)
            self.domain_masks.append({d: valid & torch.from_numpy(labels == d).to(valid.device)
                                      for d in set(dom) if d})

    @torch.no_grad()
    def _run(self, b):
        ids, am = b.input_ids.to(self.device), b.attention_mask.to(self.device)
        logits = self.handle.model(input_ids=ids, attention_mask=am, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        return logp, ce

    def clean_loss(self) -> dict:
        """The clean model's CE (nats/token) over the counted predictions and per domain, with each
        domain's number of predictions."""
        sums, counts = defaultdict(float), defaultdict(int)
        for ce, valid, masks in zip(self.clean_ce, self.valid, self.domain_masks, strict=True):
            sums[""] += float(ce[valid].sum())
            counts[""] += int(valid.sum())
            for d, m in masks.items():
                sums[d] += float(ce[m].sum())
                counts[d] += int(m.sum())
        return {"ce": sums[""] / max(counts[""], 1),
                "by_domain": {d: sums[d] / counts[d] for d in sorted(sums) if d and counts[d]},
                "predictions": {d: counts[d] for d in sorted(counts) if d}}

    def measure(self, context: Callable[[], object] | None = None, only: list[int] | None = None) -> dict:
        """ΔCE overall and per domain, and KL, for the forwards run inside `context()` (on the
        batches `only`, default all)."""
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        kl_sum, n, delta_sum = 0.0, 0, 0.0
        for i, b in enumerate(self.batches):
            if only is not None and i not in only:
                continue
            with (context() if context else _nothing()):
                logp, ce = self._run(b)
            valid = self.valid[i]
            delta = (ce - self.clean_ce[i])
            kl = (self.clean_logp[i].exp() * (self.clean_logp[i] - logp)).sum(-1)
            kl_sum += float(kl[valid].sum())
            delta_sum += float(delta[valid].sum())
            n += int(valid.sum())
            for d, m in self.domain_masks[i].items():
                sums[d] += float(delta[m].sum())
                counts[d] += int(m.sum())
        return {"delta_ce": delta_sum / max(n, 1), "kl": kl_sum / max(n, 1),
                "by_domain": {d: sums[d] / counts[d] for d in sorted(sums) if counts[d]}}
