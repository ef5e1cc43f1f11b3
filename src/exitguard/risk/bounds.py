"""Concentration bounds for the mean of bounded losses, vectorised over leading axes.

Each bound comes in two forms that agree exactly:

* a **p-value** for the null hypothesis "the risk is at least ``alpha``" (small p-values
  certify that the risk is below ``alpha``), and
* an **upper confidence bound** (UCB): with probability at least ``1 - delta`` the true risk
  is at most the UCB, and ``UCB < alpha`` exactly when ``p_value(alpha) < delta``.

All functions take losses of shape ``(..., n)`` (the last axis holds the calibration samples)
and broadcast ``alpha`` over the leading axes. Every bound assumes the ``n`` losses are i.i.d.

Bounds for losses in [0, 1] (Hoeffding-Bentkus, exact binomial) are applied to signed losses
in [-B, B] after :func:`to_unit_interval`, which clips at 0 and divides by B: the clipped risk
is never smaller than the risk, so the bound stays valid (it is conservative, as in the paper's
Eq. 16). Hoeffding and Waudby-Smith-Ramdas work on [-B, B] directly.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

_SEARCH_ELEMENTS = 1_000_000  # candidates x samples evaluated at once by a search
_SEARCH_PRECISION = 1e-14  # final bracket width, relative to the starting one


def _smallest_true(predicate, low: Array, high: Array, *, cost: int = 1) -> Array:  # type: ignore[no-untyped-def]
    """Smallest x in [low, high] with ``predicate(x)`` True, for a predicate monotone in x.

    ``predicate`` maps candidates of shape (..., M) to booleans (..., M) (False below the
    crossing, True from it on; True at ``high`` is assumed). Each round evaluates M evenly
    spaced candidates of every bracket at once and keeps the sub-interval holding the
    crossing, until the bracket is 1e-14 of its starting width. M is 64, fewer when one
    evaluation of the predicate costs ``cost`` elements per candidate and bracket (e.g. the
    number of samples), so the working memory stays near one million elements. Returns the
    upper end of the final bracket, which never undershoots the crossing.
    """
    low, high = np.array(low, dtype=np.float64), np.array(high, dtype=np.float64)
    brackets = max(1, low.size) * max(1, cost)
    points = int(min(64, max(4, _SEARCH_ELEMENTS // brackets)))
    rounds = math.ceil(math.log(1.0 / _SEARCH_PRECISION) / math.log(points - 1))
    fractions = np.linspace(0.0, 1.0, points)  # (M,)
    for _ in range(rounds):
        candidates = low[..., None] + (high - low)[..., None] * fractions  # (..., M)
        hit = predicate(candidates)  # (..., M)
        hit[..., -1] = True  # the bracket's upper end holds the crossing by construction
        first = np.argmax(hit, axis=-1)  # (...,) first True
        new_high = np.take_along_axis(candidates, first[..., None], axis=-1)[..., 0]
        previous = np.maximum(first - 1, 0)
        new_low = np.take_along_axis(candidates, previous[..., None], axis=-1)[..., 0]
        low, high = np.where(first > 0, new_low, low), new_high
    return high


def to_unit_interval(losses: Array, loss_bound: float) -> Array:
    """max(loss, 0) / B: signed losses in [-B, B] mapped to [0, 1], never below the risk."""
    return np.clip(losses, 0.0, None) / loss_bound


# ---------------------------------------------------------------------------- Hoeffding


def hoeffding_p_value(losses: Array, alpha: ArrayLike, *, loss_bound: float) -> Array:
    """Hoeffding p-value for losses in [-B, B]: ``exp(-2 n (alpha - mean)_+^2 / (2B)^2)``."""
    n = losses.shape[-1]
    gap = np.clip(np.asarray(alpha) - losses.mean(axis=-1), 0.0, None)
    return np.exp(-2.0 * n * np.square(gap) / (2.0 * loss_bound) ** 2)


def hoeffding_ucb(losses: Array, *, delta: float, loss_bound: float) -> Array:
    """Hoeffding UCB for losses in [-B, B]: ``mean + 2B sqrt(log(1/delta) / (2n))``."""
    n = losses.shape[-1]
    return losses.mean(axis=-1) + 2.0 * loss_bound * math.sqrt(math.log(1.0 / delta) / (2.0 * n))


# ---------------------------------------------------------------- Hoeffding-Bentkus, [0, 1]


def _kl_bernoulli(a: Array, b: Array) -> Array:
    """h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), with the 0 log 0 = 0 limits."""
    from scipy.special import xlogy  # imported on use: `import exitguard` stays light

    return xlogy(a, a) - xlogy(a, b) + xlogy(1.0 - a, 1.0 - a) - xlogy(1.0 - a, 1.0 - b)


def hoeffding_bentkus_p_value(mean: ArrayLike, alpha: ArrayLike, *, n: int) -> Array:
    """Hoeffding-Bentkus p-value of "risk >= alpha" for losses in [0, 1] with empirical mean.

    ``min(exp(-n h1(min(mean, alpha), alpha)), e * BinomCDF(ceil(n mean); n, alpha))``
    (Bates et al., 2021, Prop. 3; Angelopoulos et al., 2021). At ``mean = 0`` the Hoeffding
    term is ``(1 - alpha)^n`` exactly (no NaN).
    """
    mean_, alpha_ = np.broadcast_arrays(np.asarray(mean, float), np.asarray(alpha, float))
    hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(mean_, alpha_), alpha_))
    # Guard the ceiling against float noise such as 3.0000000000000004.
    successes = np.ceil(np.round(n * mean_, 9))
    from scipy import stats

    bentkus = math.e * stats.binom.cdf(successes, n, alpha_)
    return np.clip(np.minimum(hoeffding, bentkus), 0.0, 1.0)


def binomial_p_value(mean: ArrayLike, alpha: ArrayLike, *, n: int) -> Array:
    """Exact p-value of "risk >= alpha" for 0-1 losses: ``BinomCDF(n mean; n, alpha)``."""
    successes = np.round(n * np.asarray(mean, float))
    from scipy import stats

    return np.clip(stats.binom.cdf(successes, n, alpha), 0.0, 1.0)


def hoeffding_bentkus_ucb(mean: ArrayLike, *, n: int, delta: float) -> Array:
    """Largest alpha in [mean, 1] whose Hoeffding-Bentkus p-value exceeds delta.

    (The smallest rejected alpha, found by a vectorised grid refinement; 1 when none is.)
    """
    mean_ = np.asarray(mean, dtype=np.float64)
    rejected_at_one = hoeffding_bentkus_p_value(mean_, 1.0, n=n) <= delta

    def rejected(alpha: Array) -> NDArray[np.bool_]:
        # The p-value falls as alpha grows; every candidate of every row at once.
        return hoeffding_bentkus_p_value(mean_[..., None], alpha, n=n) <= delta

    return np.where(rejected_at_one, _smallest_true(rejected, mean_, np.ones_like(mean_)), 1.0)


def binomial_ucb(mean: ArrayLike, *, n: int, delta: float) -> Array:
    """Clopper-Pearson upper bound for 0-1 losses: the (1 - delta) quantile of Beta(k+1, n-k)."""
    successes = np.round(n * np.asarray(mean, float))
    with np.errstate(invalid="ignore", divide="ignore"):
        from scipy import stats

        bound = stats.beta.ppf(1.0 - delta, successes + 1, n - successes)
    return np.where(successes >= n, 1.0, bound)


# ------------------------------------------------------------- Waudby-Smith-Ramdas betting


def wsr_bets(losses: Array, *, delta: float, loss_bound: float, bet_cap: float | None) -> Array:
    """Predictable bets nu_i of the WSR wealth process (the paper's Algorithm 2); (..., n).

    ``mu_i = (1/2 + sum_{j<=i} L_j) / (i + 1)``, ``s2_i = (1/4 + sum_{j<=i} (L_j - mu_j)^2) /
    (i + 1)`` and ``nu_i = min(cap, sqrt(2 log(1/delta) / (n s2_{i-1})))`` with ``s2_0 = 1/4``.
    """
    n = losses.shape[-1]
    cap = 1.0 / loss_bound if bet_cap is None else bet_cap
    steps = np.arange(1, n + 1, dtype=np.float64)  # (n,)
    mu = (0.5 + np.cumsum(losses, axis=-1)) / (steps + 1.0)  # (..., n)
    s2 = (0.25 + np.cumsum(np.square(losses - mu), axis=-1)) / (steps + 1.0)  # (..., n)
    previous = np.concatenate([np.full((*s2.shape[:-1], 1), 0.25), s2[..., :-1]], axis=-1)
    return np.minimum(cap, np.sqrt(2.0 * math.log(1.0 / delta) / (n * previous)))


def wsr_log_wealth(losses: Array, mu: ArrayLike, *, bets: Array) -> Array:
    """``max_i log K_i(mu)`` with ``K_i(mu) = prod_{j<=i} (1 - nu_j (L_j - mu))``; shape (...)."""
    mu_ = np.asarray(mu, dtype=np.float64)[..., None]
    factors = 1.0 - bets * (losses - mu_)  # (..., n)
    with np.errstate(divide="ignore"):
        log_wealth = np.cumsum(np.log(np.clip(factors, 0.0, None)), axis=-1)  # (..., n)
    return log_wealth.max(axis=-1)


def _check_cap(bet_cap: float | None, loss_bound: float) -> float:
    cap = 1.0 / loss_bound if bet_cap is None else float(bet_cap)
    if not (0.0 < cap <= 1.0 / loss_bound):
        raise ValueError(
            f"`bet_cap` must lie in (0, 1/loss_bound] = (0, {1.0 / loss_bound:g}]; got {cap!r}."
        )
    return cap


def wsr_p_value(
    losses: Array,
    alpha: ArrayLike,
    *,
    delta: float,
    loss_bound: float,
    bet_cap: float | None = None,
) -> Array:
    """Anytime-valid p-value ``min(1, 1 / max_i K_i(alpha))`` of "risk >= alpha".

    Valid for i.i.d. losses in [-B, B] whenever every wealth factor stays positive at the true
    risk: with the default cap ``1/B`` that means a true risk above 0, which holds wherever a
    violation is possible (``alpha > 0``); the cap ``1/(2B)`` (the paper's Prop. 3) needs no
    condition. ``delta`` only enters through the bets, which are tuned for that level.
    """
    cap = _check_cap(bet_cap, loss_bound)
    bets = wsr_bets(losses, delta=delta, loss_bound=loss_bound, bet_cap=cap)
    return np.minimum(1.0, np.exp(-wsr_log_wealth(losses, alpha, bets=bets)))


def wsr_ucb(
    losses: Array, *, delta: float, loss_bound: float, bet_cap: float | None = None
) -> Array:
    """WSR upper confidence bound for the mean of losses in [-B, B] (paper Prop. 3, Remark 1).

    The smallest ``mu`` with ``max_i K_i(mu) >= 1/delta``, found by a vectorised grid
    refinement on ``[max(-B, B - 1/cap), B]`` (where every wealth factor is positive); ``B``
    when no ``mu`` is rejected. Memory: about one million elements at once (up to 64
    candidates per row).
    """
    cap = _check_cap(bet_cap, loss_bound)
    bets = wsr_bets(losses, delta=delta, loss_bound=loss_bound, bet_cap=cap)
    target = math.log(1.0 / delta)
    shape = losses.shape[:-1]
    low = np.full(shape, max(-loss_bound, loss_bound - 1.0 / cap))
    high = np.full(shape, float(loss_bound))
    rejected_at_low = wsr_log_wealth(losses, low, bets=bets) >= target

    def reached(mu: Array) -> NDArray[np.bool_]:
        # Log wealth rises with mu; every candidate of every row at once: (..., M, n).
        return wsr_log_wealth(losses[..., None, :], mu, bets=bets[..., None, :]) >= target

    return np.where(rejected_at_low, low, _smallest_true(reached, low, high, cost=losses.shape[-1]))


BOUNDS = ("hoeffding", "hb", "wsr", "binomial")


def p_values(
    losses: Array,
    alpha: ArrayLike,
    *,
    bound: str,
    delta: float,
    loss_bound: float,
    bet_cap: float | None = None,
) -> Array:
    """p-values of "risk >= alpha" for every row of ``losses`` (..., n) with the named bound."""
    n = losses.shape[-1]
    if bound == "hoeffding":
        return hoeffding_p_value(losses, alpha, loss_bound=loss_bound)
    if bound == "wsr":
        return wsr_p_value(losses, alpha, delta=delta, loss_bound=loss_bound, bet_cap=bet_cap)
    unit = to_unit_interval(losses, loss_bound).mean(axis=-1)
    alpha_unit = np.asarray(alpha) / loss_bound
    if bound == "hb":
        return hoeffding_bentkus_p_value(unit, alpha_unit, n=n)
    if bound == "binomial":
        return binomial_p_value(unit, alpha_unit, n=n)
    raise ValueError(f"`bound` must be one of {', '.join(map(repr, BOUNDS))}; got {bound!r}.")


def upper_bounds(
    losses: Array, *, bound: str, delta: float, loss_bound: float, bet_cap: float | None = None
) -> Array:
    """Upper confidence bound on the risk of every row of ``losses`` (..., n)."""
    n = losses.shape[-1]
    if bound == "hoeffding":
        return hoeffding_ucb(losses, delta=delta, loss_bound=loss_bound)
    if bound == "wsr":
        return wsr_ucb(losses, delta=delta, loss_bound=loss_bound, bet_cap=bet_cap)
    unit = to_unit_interval(losses, loss_bound).mean(axis=-1)
    if bound == "hb":
        return loss_bound * hoeffding_bentkus_ucb(unit, n=n, delta=delta)
    if bound == "binomial":
        return loss_bound * binomial_ucb(unit, n=n, delta=delta)
    raise ValueError(f"`bound` must be one of {', '.join(map(repr, BOUNDS))}; got {bound!r}.")
