"""Power analysis of the two-sided t-tests (statsmodels ``TTestPower`` for paired rows, ``TTestIndPower`` for Welch
rows): minimum detectable effect, post-hoc power, runs needed for 80 % power (Cohen 1988, ch. 2)."""

from __future__ import annotations

import math
import warnings
from functools import cache

from statsmodels.stats.power import TTestIndPower, TTestPower

ALPHA = 0.05
TARGET_POWER = 0.8


def _power_setup(n_a: int, n_b: int, paired: bool) -> tuple:
    """(statsmodels power analysis, its size arguments): one-sample TTestPower on n pairs for a paired test (effect
    size d_z), two-sample TTestIndPower on n_a vs n_b for Welch (effect size d_s)."""
    return (TTestPower(), {"nobs": n_a}) if paired else (TTestIndPower(), {"nobs1": n_a, "ratio": n_b / n_a})


@cache
def mde_d(n_a: int, n_b: int, alpha: float = ALPHA, power: float = TARGET_POWER, paired: bool = False) -> float:
    """Smallest |d| the two-sided test detects with ``power`` at these sizes: d_s for Welch (3 vs 3: 3.07), d_z for
    a paired test (3 pairs: 3.26)."""
    if min(n_a, n_b) < 2:
        return math.nan
    analysis, sizes = _power_setup(n_a, n_b, paired)
    return float(analysis.solve_power(effect_size=None, alpha=alpha, power=power, alternative="two-sided", **sizes))


def power_at(d: float, n_a: int, n_b: int, alpha: float = ALPHA, paired: bool = False) -> float:
    """Power of the two-sided test at effect |d| (d_z when paired, d_s otherwise)."""
    if min(n_a, n_b) < 2 or not math.isfinite(d):
        return math.nan
    analysis, sizes = _power_setup(n_a, n_b, paired)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        power = float(analysis.power(effect_size=abs(d), alpha=alpha, alternative="two-sided", **sizes))
        if math.isnan(power):  # scipy's nct.cdf of the far lower tail is NaN at huge d: that tail is ~0
            power = float(analysis.power(effect_size=abs(d), alpha=alpha / 2, alternative="larger", **sizes))
    return power


def n_for_power(d: float, alpha: float = ALPHA, power: float = TARGET_POWER, paired: bool = False,
                n_max: int = 10**7) -> float:
    """Smallest n >= 2 (runs per arm, equal arms; pairs when paired) with power_at(d, n, n) >= ``power``; NaN when d
    is 0 or undefined, or n > n_max. Doubling then bisection over integers on statsmodels' power (monotone in n):
    its solve_power fails or returns a wrong n where scipy's nct.cdf gives NaN at large effects."""
    if not math.isfinite(d) or d == 0:
        return math.nan
    enough = lambda n: power_at(d, n, n, alpha, paired) >= power  # noqa: E731
    low, high = 1, 2  # not enough at ``low`` (or low = 1, below the minimum), enough at ``high``
    while not enough(high):
        low, high = high, 2 * high
        if high > n_max:
            return math.nan
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return float(high)
