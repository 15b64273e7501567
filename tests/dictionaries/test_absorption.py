"""Feature absorption (dictionaries/absorption.py) on planted dictionaries: activations carry a
letter direction per first letter plus a direction per word; a dictionary whose main 'a' latent is
silent on some 'a'-words, whose own latents carry the 'a' direction, absorbs exactly those words'
tokens; a clean dictionary (the main latent fires on every 'a'-word, the word latents are
orthogonal to the letter) absorbs none."""

from __future__ import annotations

import numpy as np


def _planted(absorbing: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = "abc"
    n_words = 24  # per letter; word w of letter l is token id 100·l + w
    D = 3 + 3 * n_words  # a letter direction each, a word direction each
    word_dir = {}
    texts, rows, toks = {}, [], []
    for li, letter in enumerate(letters):
        for w in range(n_words):
            tid = 100 * li + w
            texts[tid] = " " + letter + "xyz"[w % 3] * 3
            word_dir[tid] = 3 + li * n_words + w
            for _ in range(4):  # four occurrences of each word
                x = np.zeros(D)
                x[li] = 1.0 + 0.1 * rng.random()
                x[word_dir[tid]] = 1.0
                rows.append(x + 0.01 * rng.normal(size=D))
                toks.append(tid)
    x, toks = np.asarray(rows), np.asarray(toks)
    # the dictionary: 3 letter latents (decoders e_letter), one latent per word (decoder e_word, or, for the
    # absorbed 'a'-words, e_word + e_a: the word latent took the letter in, and the letter latent is silent)
    F = 3 + 3 * n_words
    decoder = np.zeros((F, D))
    latents = np.zeros((len(toks), F))
    absorbed_words = {w for w in range(n_words) if w % 2 == 0} if absorbing else set()
    for i in range(F):
        decoder[i, i] = 1.0
    for w in absorbed_words:
        decoder[3 + w, 0] = 1.0  # word w of 'a' writes the 'a' direction too
    for i, tid in enumerate(toks):
        li, w = divmod(int(tid), 100)
        latents[i, 3 + li * n_words + w] = 1.0
        if not (li == 0 and w in absorbed_words):
            latents[i, li] = 1.0 + 0.1 * rng.random()
    return x, latents, decoder, toks, texts, absorbed_words


def test_absorbed_words_are_found_and_a_clean_dictionary_absorbs_nothing():
    from deepseemoe.dictionaries.absorption import absorption, first_letters

    x, latents, decoder, toks, texts, absorbed = _planted(absorbing=True)
    letters = first_letters(texts)
    assert set(letters.values()) == {"a", "b", "c"}
    r = absorption(x, latents, decoder, toks, letters)
    a = r["letters"]["a"]
    assert a["main_latent"] == 0 and a["probe_f1"] == 1.0
    # held-out 'a'-tokens: those of absorbed words are absorbed, the others are not
    from deepseemoe.dictionaries.absorption import _split_vocab

    words = np.asarray([t in letters for t in toks])
    test = ~_split_vocab(toks[words], 0)
    held = toks[words][test]
    a_held = held[held < 100]
    expected = np.isin(a_held, list(absorbed)).mean()
    assert 0 < expected < 1 and a["absorption"] == expected and a["miss"] == expected
    assert r["letters"]["b"]["absorption"] == 0 and r["letters"]["c"]["absorption"] == 0

    clean = absorption(*_planted(absorbing=False)[:4], letters)
    assert clean["absorption"] == 0 and clean["miss"] == 0


def test_a_missed_token_without_a_latent_along_the_letter_is_missed_not_absorbed():
    from deepseemoe.dictionaries.absorption import absorption, first_letters

    x, latents, decoder, toks, texts, _ = _planted(absorbing=True)
    decoder[3:, 0] = 0.0  # the word latents no longer carry the letter: the letter is lost, not absorbed
    r = absorption(x, latents, decoder, toks, first_letters(texts))
    assert r["letters"]["a"]["absorption"] == 0 and r["letters"]["a"]["miss"] > 0
