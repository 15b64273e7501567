"""Mean ± spread over seeds: one definition for every study that repeats its points over seeds
(post-training, the reach sweep) and for the pages that show them."""

from __future__ import annotations

import numpy as np


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
