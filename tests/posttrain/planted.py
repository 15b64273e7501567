"""A hand-set one-layer OLMoE with a planted token family, a word-level tokenizer for it, and a hand-set
SAE feature that fires exactly on that family.

Words `a0`…`a9` (ids 10–19) are the family: embedding coordinate 0 is +1 on them and −1 on every other
token, so the SAE feature 0 = relu(10·x₀) fires on the family and nowhere else. Attention writes
nothing (o_proj = 0), so the MoE block reads each token's own embedding. Top-1 routing:
`a0`…`a5` → expert 1 (logit 8 = x₀ after the RMS norm), `a6`…`a9` → expert 3 (they also carry
coordinate 1: logit 1.2·5.66 = 6.79 against expert 1's 5.66), `b*` → expert 0, `c*` → expert 2, BOS
→ expert 0. Expert 1 alone serves most of the family; no other token ever reaches experts 1 or 3."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

FAMILY = list(range(10, 20))
MOVABLE = list(range(16, 20))  # family words routed to expert 3
WORDS = {f"{p}{i}": base + i for p, base in (("a", 10), ("b", 20), ("c", 30)) for i in range(10)}


def tokenizer(folder: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **WORDS}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def model_folder(folder: Path) -> Path:
    from deepseemoe.models.tiny import tiny_model

    tokenizer(folder)
    model = tiny_model("olmoe", vocab_size=40, num_hidden_layers=1, num_experts=4, num_experts_per_tok=1,
                       bos_token_id=1, pad_token_id=0, eos_token_id=2)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = -1.0
        emb[FAMILY, 0] = 1.0
        emb[MOVABLE, 1] = 1.0
        emb[20:30, 2] = 1.0
        emb[1, 2] = 1.0
        emb[30:40, 3] = 1.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm.weight.fill_(1.0)
        gate = layer.mlp.gate.weight
        gate.zero_()
        gate[1, 0] = 1.0
        gate[3, 1] = 1.2
        gate[0, 2] = 1.0
        gate[2, 3] = 1.0
    model.save_pretrained(folder)
    return folder


def documents(path: Path, n: int, seed: int, domains=("a", "b", "c")) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            d = domains[i % len(domains)]
            f.write(json.dumps({"text": " ".join(f"{d}{rng.randrange(10)}" for _ in range(24)), "domain": d}) + "\n")
    return path


def top1(model, ids: list[int]) -> list[int]:
    """The top-1 expert of each token id, read from the model's own router logits (a plain HF forward)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    return out.router_logits[0].reshape(len(ids), -1).argmax(-1).tolist()


def planted_sae(run_dir: Path, name: str) -> None:
    """Overwrite the trained coder NAME with the hand-set one: feature 0 = relu(10·x₀), the others never fire."""
    from deepseemoe.dictionaries.formats import load_native, save_native

    folder = run_dir / "dictionaries" / name
    coder, meta = load_native(folder)
    with torch.no_grad():
        coder.W_enc.zero_()
        coder.W_enc[0, 0] = 10.0
        coder.b_enc.fill_(-1.0)
        coder.b_enc[0] = 0.0
        coder.b_dec.zero_()
    save_native(coder, folder, meta)
