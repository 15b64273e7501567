"""Feature absorption (Chanin et al. 2024, "A is for Absorption"; SAEBench's first-letter task), on the
tokens of the evaluation text.

The task: does a token spell a word starting with letter L? For each letter with enough tokens, a
logistic probe on the activations the dictionary reads gives the letter's direction p (the ground
truth that the model represents the letter). The dictionary's *main* latent for L is the one whose
mean differs most between L-tokens and the others (SAEBench's k = 1 sparse probe). On held-out
tokens (the vocabulary is split in half, so probe and latent meet words they never saw) where the
probe says L and is right, each token is judged as SAEBench's `FeatureAbsorptionCalculator` judges
a word (`token_absorption`; checked against its own code in tests/dictionaries/
test_absorption_vs_saebench.py). A latent's projection on the letter is its activation × the cosine
of its decoder row with p; the activation's own projection is x · p. *Full absorption*: the main
latent is silent, and the latent of the largest projection has cosine ≥ `min_cos` with p and
carries ≥ `min_share` of x · p (≥ 0). *Absorption fraction*: the share of x · p that up to 3 other
latents aligned with p (cosine ≥ 0.1) carry in place of the main latent (0 when those carry less
than `min_share` of it). Per letter: the full-absorption rate and the mean fraction over the
probe-correct tokens (SAEBench's `full_absorption_rate` and `mean_absorption_fraction`); its *miss*
rate is main-silent / probe-correct tokens (absorbed or simply lost).
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


EPS = 1e-8  # SAEBench's: a latent below it is silent
FRACTION_MIN_COS = 0.1  # SAEBench's: a latent that may stand in for the main one points along p this much
FRACTION_MAX_LATENTS = 3  # SAEBench's: at most this many stand in together


def token_absorption(x_proj: np.ndarray, latents, cos: np.ndarray, main: list[int], *, min_cos: float = 0.025,
                     min_share: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Per token: full absorption (bool) and the absorption fraction, as SAEBench's calculator
    defines them (module docstring). `x_proj` [n] x · p with p a unit vector, `latents` [n, F] the
    codes (scipy CSR), `cos` [F] each decoder row's cosine with p, `main` the main latent(s)."""
    from scipy import sparse

    latents = sparse.csr_matrix(latents)
    full, fraction = np.zeros(len(x_proj), dtype=bool), np.zeros(len(x_proj))
    main_set = set(main)
    for i in range(len(x_proj)):
        row = latents.getrow(i)
        ids, acts = row.indices, row.data
        proj = acts * cos[ids]
        total = float(x_proj[i])
        is_main = np.isin(ids, list(main_set))
        main_proj = float(proj[is_main].sum())
        # full: every main latent silent; the top projection (inactive latents project 0) along p and
        # at least min_share of x · p
        silent = not np.any(acts[is_main] >= EPS)
        top = int(np.argmax(proj)) if len(proj) else -1
        top_proj = float(proj[top]) if top >= 0 and proj[top] > 0 else 0.0
        if silent and top_proj > 0 and cos[ids[top]] >= min_cos and total >= 0 and top_proj >= min_share * total:
            full[i] = True
        # fraction: up to 3 other latents along p stand in for the main one
        stand_in = np.sort(proj[(~is_main) & (cos[ids] >= FRACTION_MIN_COS) & (proj > 0)])[::-1][:FRACTION_MAX_LATENTS]
        carried = float(stand_in.sum())
        if total <= 0 or main_proj >= total or carried < min_share * total:
            fraction[i] = 0.0
        elif main_proj <= 0:
            fraction[i] = 1.0
        else:
            absorbed = min(carried, total - main_proj)
            fraction[i] = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    return full, fraction


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
        cos = units @ p  # [F] each decoder row's cosine with the letter's direction
        at = np.nonzero(right)[0]
        codes = latents[at]
        full, fraction = token_absorption(x[at] @ p, codes, cos, [main], min_cos=min_cos, min_share=min_share)
        missed = codes[:, [main]].toarray().ravel() < EPS
        n = len(at)
        per[value] = {"tokens": n, "main_latent": main, "main_cos": float(cos[main]),
                      "absorption": float(full.mean()) if n else float("nan"),
                      "absorption_fraction": float(fraction.mean()) if n else float("nan"),
                      "miss": float(missed.mean()) if n else float("nan"),
                      "probe_f1": float(_f1(y[~train], probe.predict(x[~train]) == 1))}
    if not per:
        return {"note": f"absorption needs ≥ {MIN_TOKENS} word tokens of a letter in each half of the vocabulary; "
                        "give more --tokens"}
    counted = [v for v in per.values() if v["tokens"]]
    return {"letters": per, "absorption": _mean(v["absorption"] for v in counted),
            "absorption_fraction": _mean(v["absorption_fraction"] for v in counted),
            "miss": _mean(v["miss"] for v in counted), "min_cos": min_cos, "min_share": min_share, "seed": seed}


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((y & pred).sum())
    return 2 * tp / max(float(y.sum() + pred.sum()), 1.0)
