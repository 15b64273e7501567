"""Feature absorption (Chanin et al. 2024, "A is for Absorption"; SAEBench's first-letter task), on the
tokens of the evaluation text.

The task: does a token spell a word starting with letter L? For each letter with enough tokens, a
logistic probe on the activations the dictionary reads gives the letter's direction p (the ground
truth that the model represents the letter). The dictionary's *main* latent for L is the one whose
mean differs most between L-tokens and the others (SAEBench's k = 1 sparse probe). On held-out
tokens (the vocabulary is split in half, so probe and latent meet words they never saw) where the
probe says L and is right, the main latent should fire; where it stays silent, the letter went
somewhere: the token is *absorbed* when an active latent whose decoder points along p (cosine ≥
`min_cos`) carries at least `min_share` of the reconstruction's projection on p — another latent
(a word's own, say) took the letter's direction in. The absorption rate of a letter is absorbed /
probe-correct tokens; its *miss* rate is main-silent / probe-correct tokens (absorbed or simply lost).
Only for dictionaries that reconstruct what they read (SAEs): a transcoder's decoder writes elsewhere.
"""

from __future__ import annotations

import numpy as np

MIN_TOKENS = 8  # per letter, in each half


def first_letters(texts: dict[int, str]) -> dict[int, str]:
    """token id -> the lowercase letter a word-starting token begins with (a leading space or a
    BPE/SentencePiece space marker is a word start); tokens that are not words are left out."""
    out = {}
    for tid, text in texts.items():
        word = text.lstrip(" Ġ▁\n\t")
        if len(word) >= 2 and word[0].isascii() and word[0].isalpha() and word.isalpha():
            out[tid] = word[0].lower()
    return out


def _split_vocab(tokens: np.ndarray, seed: int) -> np.ndarray:
    """True for tokens whose id falls in the training half of the ids present."""
    ids = np.unique(tokens)
    rng = np.random.default_rng(seed)
    train_ids = rng.permutation(ids)[: len(ids) // 2]
    return np.isin(tokens, train_ids)


def absorption(x: np.ndarray, latents: np.ndarray, decoder: np.ndarray, tokens: np.ndarray,
               letters: dict[int, str], *, min_cos: float = 0.025, min_share: float = 0.4, seed: int = 0) -> dict:
    """`x` [N, D] the activations the dictionary reads, `latents` [N, F] its codes, `decoder` [F, D]
    its decoder rows, `tokens` [N] the token ids, `letters` token id -> first letter (module
    docstring). Returns per letter and the mean over letters."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    letter = np.asarray([letters.get(int(t), "") for t in tokens], dtype=object)
    words = letter != ""
    latents = sparse.csr_matrix(latents)[np.nonzero(words)[0]]  # k-sparse codes: rows of a few latents
    x, tokens, letter = x[words], tokens[words], letter[words]
    train = _split_vocab(tokens, seed)
    units = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    per = {}
    for value in sorted(set(letter.tolist())):
        y = letter == value
        if min((y & train).sum(), (y & ~train).sum(), (~y & train).sum()) < MIN_TOKENS:
            continue
        probe = LogisticRegression(class_weight="balanced", max_iter=2000).fit(x[train], y[train])
        p = probe.coef_[0] / max(np.linalg.norm(probe.coef_[0]), 1e-12)
        diff = np.asarray(latents[np.nonzero(train & y)[0]].mean(0)).ravel() - \
            np.asarray(latents[np.nonzero(train & ~y)[0]].mean(0)).ravel()
        main = int(np.argmax(diff))
        right = (~train) & y & (probe.predict(x) == 1)
        missed = right & (latents[:, [main]].toarray().ravel() <= 0)
        cos = units @ p  # [F] each decoder row's cosine with the letter's direction
        absorbed = 0
        for i in np.nonzero(missed)[0]:
            row = latents.getrow(i)
            active, values = row.indices[row.data > 0], row.data[row.data > 0]
            if not len(active):
                continue
            along = values * (decoder[active] @ p)  # each active latent's projection on p
            total = along[along > 0].sum()
            j = int(np.argmax(along))
            if cos[active[j]] >= min_cos and total > 0 and along[j] >= min_share * total:
                absorbed += 1
        n = int(right.sum())
        per[value] = {"tokens": n, "main_latent": main, "main_cos": float(cos[main]),
                      "absorption": absorbed / n if n else float("nan"), "miss": int(missed.sum()) / n if n else float("nan"),
                      "probe_f1": float(_f1(y[~train], probe.predict(x[~train]) == 1))}
    if not per:
        return {"note": f"absorption needs ≥ {MIN_TOKENS} word tokens of a letter in each half of the vocabulary; "
                        "give more --tokens"}
    rates = [v["absorption"] for v in per.values() if v["tokens"]]
    misses = [v["miss"] for v in per.values() if v["tokens"]]
    return {"letters": per, "absorption": float(np.mean(rates)) if rates else float("nan"),
            "miss": float(np.mean(misses)) if misses else float("nan"), "min_cos": min_cos, "min_share": min_share,
            "seed": seed}


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((y & pred).sum())
    return 2 * tp / max(float(y.sum() + pred.sum()), 1.0)
