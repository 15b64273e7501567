"""Information measures: one definition each, for every study that reports them.

  entropy(p)              H = −Σ p log p in nats, over `axis`, after normalising p to sum 1 (zero
                          rows give 0); zero cells contribute 0
  normalised_entropy(p)   H / log n over the n cells of `axis`: 1 for an even spread, 0 for one cell
                          (load entropy of experts, class entropy, a unit's spread over classes)
  mutual_information(joint)  (MI in bits, NMI) of a joint count table, NMI = I / ((H(X) + H(Y)) / 2)
                          (arithmetic-mean normalisation, as scikit-learn's default); two constant
                          labelings are the same partition (NMI 1), one constant and one not share
                          nothing (NMI 0), as scikit-learn's normalized_mutual_info_score has it

Over seeds (every study that repeats its points over seeds — post-training, the reach sweep — and
the pages that show them):
  over_seeds(values)      mean and sample sd (ddof 1) of the values that are not NaN
  apart(a, sd_a, b, sd_b) the two means differ by more than the sum of their sds
  plus_minus(v, sd)       "mean ± sd", as every table prints it
"""

from __future__ import annotations

import numpy as np


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    p = p / np.clip(p.sum(axis=axis, keepdims=True), 1e-300, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=axis)


def normalised_entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy over log n, n the cells along `axis` (NaN where n < 2: no spread to measure)."""
    n = np.asarray(p).shape[axis]
    return entropy(p, axis) / np.log(n) if n > 1 else np.full(np.asarray(entropy(p, axis)).shape, np.nan)


def mutual_information(joint: np.ndarray) -> tuple[float, float]:
    """(MI in bits, NMI) of a joint count table (module docstring)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total == 0:
        return 0.0, 0.0
    p = joint / total
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = float(np.nansum(np.where(p > 0, p * np.log(p / (px * py)), 0.0)))
    hx, hy = float(entropy(px.ravel())), float(entropy(py.ravel()))
    if hx == 0 and hy == 0:
        nmi = 1.0
    elif hx == 0 or hy == 0:
        nmi = 0.0
    else:
        nmi = max(0.0, 2 * mi / (hx + hy))
    return max(mi, 0.0) / np.log(2), nmi


def over_seeds(values) -> tuple[float, float]:
    """The mean and the sample standard deviation (ddof 1) of the values that are not NaN; the mean
    is NaN when none is, the sd when fewer than two are."""
    a = np.asarray(list(values), dtype=float)
    ok = a[~np.isnan(a)]
    return (float(ok.mean()) if len(ok) else float("nan"),
            float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"))


def apart(a: float, sd_a: float, b: float, sd_b: float) -> bool:
    """The two means differ by more than the sum of their seeds' sds (a missing sd counts 0): only
    then is a difference called one."""
    return bool(abs(a - b) > np.nan_to_num(sd_a) + np.nan_to_num(sd_b))


def plus_minus(v: float | None, sd: float | None, digits: int = 4, signed: bool = False) -> str:
    """"mean ± sd" (sd left out when missing); "–" for a missing mean; `signed` for differences."""
    if v is None or np.isnan(v):
        return "–"
    sign = "+" if signed else ""
    v = 0.0 if round(v, digits) == 0 else v  # a tiny negative would print as −0.0000
    return f"{v:{sign}.{digits}f}" + ("" if sd is None or np.isnan(sd) else f" ± {sd:.{digits}f}")
