"""A byte-level BPE tokenizer trained on the demo corpus, saved as a Hugging Face fast tokenizer."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def balanced_sample(docs: list[dict], bytes_per_domain: int) -> list[str]:
    """The first documents of each domain up to a byte budget, so no domain dominates the merges."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    for d in docs:
        size = len(d["text"].encode())
        if taken[d["domain"]] + size <= bytes_per_domain:
            taken[d["domain"]] += size
            out.append(d["text"])
    return out


def train_tokenizer(train_docs: list[dict], out_dir: Path, vocab_size: int, bytes_per_domain: int):
    """Train and save; `AutoTokenizer.from_pretrained(out_dir)` loads the result."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(balanced_sample(train_docs, bytes_per_domain), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=1 << 20)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
