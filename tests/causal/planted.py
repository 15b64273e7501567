"""A hand-built OLMoE whose routing is planted by domain, and packed a|b contexts for it.

Attention writes nothing (o_proj = 0), so each prediction depends on its own token only. `a`
tokens (ids 10–19) route to expert 0 in every layer; `b` tokens (20–29) and BOS never do (with
`b_expert`, b tokens route to that expert instead, as their first choice, and BOS to `bos_expert`)."""

from __future__ import annotations

import torch


def planted_model(top_k: int = 2, num_experts: int = 4, b_expert: int | None = None, bos_expert: int = 2):
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    model = tiny_model("olmoe", vocab_size=32, num_experts=num_experts, num_experts_per_tok=top_k, bos_token_id=1)
    with torch.no_grad():
        v = torch.zeros(model.config.hidden_size)
        v[0] = 1.0
        emb = model.model.embed_tokens.weight
        emb[:, 0] = -3.0  # BOS, b tokens and the rest: away from expert 0
        emb[10:20, 0] = 3.0  # a tokens: toward expert 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate.weight[0] = 50.0 * v
            if b_expert is not None:
                layer.mlp.gate.weight[b_expert] = -50.0 * v
                layer.mlp.gate.weight[bos_expert, 1] = 50.0
        if b_expert is not None:  # BOS: to an expert of its own, so removing b's expert leaves `a` untouched
            emb[1, 0], emb[1, 1] = 0.0, 3.0
    return handle_from_model(model)


def planted_batch(contexts: int = 4, seed: int = 0):
    """Contexts BOS a… BOS b… BOS a… packed, domains 'a' and 'b'."""
    from deepseemoe.data.tokens import PackedBatch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(contexts):
        ids, d, p = [], [], []
        for j, (lo, dom_doc) in enumerate([(10, 2 * r), (20, 2 * r + 1), (10, 100 + r)]):
            n = 4 + j
            ids += [1, *torch.randint(lo, lo + 10, (n,), generator=g).tolist()]
            d += [dom_doc] * (n + 1)
            p += [-1, *range(n)]
        rows.append((ids, d, p))
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in rows])
    doc = torch.tensor([r[1] + [-1] * (width - len(r[1])) for r in rows])
    pos = torch.tensor([r[2] + [-1] * (width - len(r[2])) for r in rows], dtype=torch.int32)
    domains = {dd: ("b" if dd % 2 and dd < 100 else "a") for dd in doc.unique().tolist() if dd >= 0}
    return PackedBatch(ids, (doc >= 0).long(), doc, pos, domains)
