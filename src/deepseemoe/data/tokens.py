"""Tokenize documents and pack them into fixed-length contexts, keeping each token's provenance.

Shapes: a `PackedBatch` holds input_ids, attention_mask, doc and pos, all [B, S] (S = ctx_len).

Packing: every document starts with BOS (when the tokenizer has one); documents are laid end
to end and cut into contexts of `ctx_len` tokens; a context that starts inside a document gets
a BOS of its own so no context begins mid-stream without one. `pos` is the token's index in
its document's tokenization (BOS is -1), so routing rows map back to the text. The last
context is padded (attention 0, doc -1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from deepseemoe.data.sources import Document, TextSource, iter_documents
from deepseemoe.errors import DeepSeeMoEError


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64
    doc: torch.Tensor  # [B, S] int64 document id, -1 on padding
    pos: torch.Tensor  # [B, S] int32 position in the document, -1 on BOS and padding
    domains: dict[int, str | None]  # doc id -> domain of the documents in this batch

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def keep(self) -> torch.Tensor:
        """[B*S] bool: the kept tokens — real text, not padding and not the BOS the packer inserted.
        The one kept-token mask of the project: it is told by `pos`, never by comparing token ids
        with a BOS id (a tokenizer without BOS, or text that spells the BOS token, would shift it)."""
        return (self.attention_mask.bool() & (self.pos >= 0)).reshape(-1)


def _special_ids(tokenizer) -> tuple[int | None, int]:
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (bos if bos is not None else 0)
    return bos, pad


def pack_documents(tokenizer, documents: Iterable[Document], *, ctx_len: int, batch_size: int,
                   max_tokens: int | None = None, add_bos: bool = True) -> Iterator[PackedBatch]:
    """Yield batches of packed contexts until the documents or the token budget run out.

    `max_tokens` counts real (non-padding) tokens, BOS included.
    """
    if ctx_len < 2:
        raise DeepSeeMoEError(f"--ctx-len must be at least 2, got {ctx_len}")
    bos, pad = _special_ids(tokenizer)
    use_bos = add_bos and bos is not None
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids, docs, poss = [], [], []
    domains: dict[int, str | None] = {}
    budget = max_tokens if max_tokens is not None else float("inf")
    used = 0

    def flush():
        nonlocal rows, domains
        B = len(rows)
        input_ids = torch.full((B, ctx_len), pad, dtype=torch.long)
        mask = torch.zeros((B, ctx_len), dtype=torch.long)
        doc = torch.full((B, ctx_len), -1, dtype=torch.long)
        pos = torch.full((B, ctx_len), -1, dtype=torch.int32)
        for b, (r_ids, r_docs, r_pos) in enumerate(rows):
            n = len(r_ids)
            input_ids[b, :n] = torch.tensor(r_ids)
            mask[b, :n] = 1
            doc[b, :n] = torch.tensor(r_docs)
            pos[b, :n] = torch.tensor(r_pos, dtype=torch.int32)
        batch = PackedBatch(input_ids, mask, doc, pos, domains)
        rows, domains = [], {}
        return batch

    def close_row():
        rows.append((ids.copy(), docs.copy(), poss.copy()))
        ids.clear(), docs.clear(), poss.clear()

    for document in documents:
        tokens = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        if not tokens:
            continue
        domains[document.doc_id] = document.domain
        start = True
        for i, tok in enumerate(tokens):
            if used >= budget:
                break
            if use_bos and (start or not ids):
                if len(ids) >= ctx_len - 1:  # no room for BOS + a token: start a new context
                    close_row()
                    if len(rows) == batch_size:
                        yield flush()
                        domains[document.doc_id] = document.domain
                ids.append(bos), docs.append(document.doc_id), poss.append(-1)
                used += 1
                start = False
            ids.append(tok), docs.append(document.doc_id), poss.append(i)
            used += 1
            if len(ids) == ctx_len:
                close_row()
                if len(rows) == batch_size:
                    yield flush()
                    domains[document.doc_id] = document.domain
        if used >= budget:
            break
    if ids:
        close_row()
    if rows:
        yield flush()


def heldout_batches(handle, data: str | TextSource, *, tokens: int | None, ctx_len: int | None = None,
                    batch_size: int = 8, domain_field: str | None = "domain") -> list[PackedBatch]:
    """The held-out text every verb measures on: `data` (a source spec, or a `TextSource` with its own
    settings) packed with `handle`'s tokenizer into contexts of `ctx_len` tokens (checked against the
    model's position limit; default its own), `tokens` real tokens at most."""
    source = data if isinstance(data, TextSource) else TextSource(data, domain_field=domain_field)
    return list(pack_documents(handle.require_tokenizer(), iter_documents(source), ctx_len=handle.check_ctx_len(ctx_len),
                               batch_size=batch_size, max_tokens=tokens))


def within_document(batch) -> torch.Tensor:
    """[B, S-1] bool: the predictions whose read token and predicted token are one document's."""
    read, target = batch.doc[:, :-1], batch.doc[:, 1:]
    return (read >= 0) & (read == target)


def counted_predictions(batch) -> torch.Tensor:
    """[B, S-1] bool: the next-token predictions a loss counts — read and predicted token both real
    (not padding) and of one document."""
    am = batch.attention_mask.bool()
    return am[:, 1:] & am[:, :-1] & within_document(batch)


def token_domains(batch) -> list[str]:
    """The domain of each prediction position [B·(S-1)]: the domain of the document of the token
    *read*; "" for padding and for predictions that cross into the next document."""
    doc = batch.doc[:, :-1].reshape(-1).tolist()
    within = within_document(batch).reshape(-1).tolist()
    return [(batch.domains.get(d) or "all") if ok else "" for d, ok in zip(doc, within, strict=True)]


def split_halves(batches: list) -> tuple[list, list]:
    """Disjoint (selection, evaluation) halves of the held-out contexts: alternate rows (contexts) of
    all batches, re-batched at the batches' size, so a short last batch unbalances nothing."""
    rows = [(b, r) for b in batches for r in range(b.input_ids.shape[0])]
    if len(rows) < 2:
        raise DeepSeeMoEError("too few held-out contexts to select units on one half and score them on the other "
                              "(need at least 2); give more --tokens")
    size = max(b.input_ids.shape[0] for b in batches)

    def rebatch(picked: list) -> list:
        out = []
        for i in range(0, len(picked), size):
            part = picked[i:i + size]
            stack = [torch.stack([getattr(b, f)[r] for b, r in part]) for f in ("input_ids", "attention_mask", "doc",
                                                                                "pos")]
            domains = {k: v for b, _ in part for k, v in b.domains.items()}
            out.append(type(part[0][0])(*stack, domains))
        return out

    return rebatch(rows[0::2]), rebatch(rows[1::2])
