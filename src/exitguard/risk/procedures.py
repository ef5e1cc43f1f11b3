"""Threshold-selection procedures on loss tables, vectorised over repeated draws and targets.

A loss table has shape ``(..., K, n)``: row 0 is the full model (loss-free by construction),
rows ``1 .. K-1`` grow more aggressive. Every procedure first decides, for every target risk
``epsilon``, which rows *pass* its test (:func:`passes`), then picks a row (:func:`select`):

=================  ==========================================================  ============
procedure          a row k >= 1 passes when                                    pick
=================  ==========================================================  ============
naive              mean loss <= epsilon (Eq. 9)                                last passing
crc                n/(n+1) mean + B/(n+1) <= epsilon (Eq. 10)                  last passing
ucb-<bound>        UCB < epsilon, i.e. p-value < delta (Eqs. 11-12)            end of run
ltt                Hoeffding-Bentkus p-value <= delta                          end of run
ltt-bonferroni     Hoeffding-Bentkus p-value <= delta / (K - 1)                last passing
=================  ==========================================================  ============

"end of run" is fixed-sequence testing from the safe end: the last row of the unbroken run of
passing rows that starts at row 1 (for UCB this is Eq. 12's "every threshold between the full
model and the chosen one must pass"; for LTT it is the last rejected hypothesis). When no row
passes, the answer is row 0, the full model, and the selection is not certified.

Guarantees (calibration and test data i.i.d.; losses in [-B, B]):

* naive: none.
* crc: E[R] <= epsilon over calibration draws, if the risk is monotone along the grid.
* ucb-*, ltt, ltt-bonferroni: P(R <= epsilon) >= 1 - delta over calibration draws. For the
  run-based procedures the argument is that of fixed-sequence testing: a violation needs the
  first row whose true risk exceeds epsilon to pass, which happens with probability at most
  delta; no monotonicity is needed for validity (it only makes the selection efficient).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from exitguard.risk import bounds

Array = NDArray[np.float64]

PROCEDURES = (
    "naive",
    "crc",
    "ucb-hoeffding",
    "ucb-hb",
    "ucb-wsr",
    "ucb-binomial",
    "ltt",
    "ltt-bonferroni",
)
"""Canonical procedure names."""

ALIASES = {"ucb": "ucb-wsr", "ltt-hb": "ltt", "ltt-fixed-sequence": "ltt"}

_RUN_BASED = {"ucb-hoeffding", "ucb-hb", "ucb-wsr", "ucb-binomial", "ltt"}


def canonical_procedure(procedure: str) -> str:
    """The canonical name of a procedure (``"ucb"`` means ``"ucb-wsr"``)."""
    name = ALIASES.get(procedure, procedure) if isinstance(procedure, str) else procedure
    if name not in PROCEDURES:
        allowed = ", ".join(repr(p) for p in (*PROCEDURES, *ALIASES))
        raise ValueError(f"`procedure` must be one of {allowed}; got {procedure!r}.")
    return str(name)


def has_guarantee(procedure: str) -> bool:
    return canonical_procedure(procedure) != "naive"


def is_high_probability(procedure: str) -> bool:
    """True for procedures that bound P(R > epsilon) by delta (UCB and LTT)."""
    return canonical_procedure(procedure) not in ("naive", "crc")


def _bound_of(procedure: str) -> str:
    return {"ltt": "hb", "ltt-bonferroni": "hb"}.get(procedure, procedure.removeprefix("ucb-"))


def _check_binary(losses: Array, loss_bound: float) -> None:
    unit = bounds.to_unit_interval(losses, loss_bound)
    if not np.all((unit == 0.0) | (unit == 1.0)):
        raise ValueError(
            "procedure 'ucb-binomial' needs 0-1 losses (after clipping at 0 and dividing by "
            "`loss_bound`); got other values. Use 'ucb-wsr' or 'ucb-hb' for general losses."
        )


def statistics(
    losses: Array,
    target_risks: Array,
    *,
    procedure: str,
    delta: float,
    loss_bound: float,
    bet_cap: float | None = None,
) -> Array:
    """The per-row test statistic behind :func:`passes`; shape (..., E, K).

    naive: the mean loss; crc: the adjusted mean ``n/(n+1) mean + B/(n+1)``; ucb-* and ltt:
    the p-value of "risk >= epsilon" (each epsilon of ``target_risks`` (E,)).
    """
    procedure = canonical_procedure(procedure)
    n = losses.shape[-1]
    mean = losses.mean(axis=-1)  # (..., K)
    epsilons = np.asarray(target_risks, dtype=np.float64)  # (E,)
    if procedure in ("naive", "crc"):
        value = mean if procedure == "naive" else (n * mean + loss_bound) / (n + 1)  # (..., K)
        shape = (*value.shape[:-1], len(epsilons), value.shape[-1])
        return np.broadcast_to(value[..., None, :], shape)  # the same for every epsilon
    bound = _bound_of(procedure)
    if bound == "binomial":
        _check_binary(losses, loss_bound)
    if bound == "wsr":
        # The bets do not depend on epsilon: compute them once, then one wealth pass per epsilon
        # (a loop over the few target risks keeps memory at one (..., K, n) array).
        cap = bounds._check_cap(bet_cap, loss_bound)
        bets = bounds.wsr_bets(losses, delta=delta, loss_bound=loss_bound, bet_cap=cap)
        columns = [
            np.minimum(1.0, np.exp(-bounds.wsr_log_wealth(losses, eps, bets=bets)))
            for eps in epsilons
        ]
        return np.stack(columns, axis=-2)  # (..., E, K)
    return bounds.p_values(
        losses[..., None, :, :],
        epsilons[:, None],
        bound=bound,
        delta=delta,
        loss_bound=loss_bound,
        bet_cap=bet_cap,
    )  # (..., E, K)


def passes(
    stats: Array, target_risks: Array, *, procedure: str, delta: float, n_rows: int
) -> NDArray[np.bool_]:
    """Which rows pass the procedure's test, from :func:`statistics`; shape (..., E, K)."""
    procedure = canonical_procedure(procedure)
    epsilons = np.asarray(target_risks, dtype=np.float64)[:, None]  # (E, 1)
    if procedure in ("naive", "crc"):
        return stats <= epsilons
    if procedure == "ltt":
        return stats <= delta
    if procedure == "ltt-bonferroni":
        return stats <= delta / max(n_rows - 1, 1)
    return stats < delta  # UCB < epsilon exactly when p-value(epsilon) < delta


def select(ok: NDArray[np.bool_], *, procedure: str) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """The selected row and whether it is certified, from :func:`passes`; shapes (...,).

    Row 0 (the full model) never needs to pass: it is the fallback. Run-based procedures take
    the end of the unbroken run of passing rows from row 1; the others the last passing row.
    """
    procedure = canonical_procedure(procedure)
    candidates = ok[..., 1:]  # (..., K-1)
    if candidates.shape[-1] == 0:  # a grid holding only the full model
        return np.zeros(ok.shape[:-1], dtype=np.int64), np.zeros(ok.shape[:-1], dtype=bool)
    if procedure in _RUN_BASED:
        index = np.cumprod(candidates, axis=-1).sum(axis=-1)  # length of the leading run
    else:
        n_candidates = candidates.shape[-1]
        last = n_candidates - np.argmax(candidates[..., ::-1], axis=-1)  # 1-based last True
        index = np.where(candidates.any(axis=-1), last, 0)
    index = index.astype(np.int64)
    certified = (index > 0) & (procedure != "naive")
    return index, np.asarray(certified)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Outcome of one procedure on one calibration table.

    Attributes
    ----------
    index : int
        Selected row (0 = the full model).
    certified : bool
        Whether the procedure certified an early-exit row.
    empirical_risk : array (K,)
        Mean calibration loss of every row.
    statistic : array (K,)
        The procedure's per-row statistic at this target risk (see :func:`statistics`).
    passed : bool array (K,)
        Which rows passed the test.
    upper_bound : array (K,) or None
        Upper confidence bound of every row (UCB procedures only).
    """

    index: int
    certified: bool
    empirical_risk: Array
    statistic: Array
    passed: NDArray[np.bool_]
    upper_bound: Array | None

    def __repr__(self) -> str:
        return (
            f"Selection(index={self.index}, certified={self.certified}, "
            f"empirical_risk={self.empirical_risk[self.index]:.4g}, rows={len(self.passed)})"
        )


def run(
    losses: Array,
    *,
    target_risk: float,
    delta: float,
    procedure: str,
    loss_bound: float,
    bet_cap: float | None = None,
) -> Selection:
    """Run one procedure on a validated table ``losses`` (K, n)."""
    procedure = canonical_procedure(procedure)
    epsilons = np.array([target_risk])
    stats = statistics(
        losses, epsilons, procedure=procedure, delta=delta, loss_bound=loss_bound, bet_cap=bet_cap
    )  # (1, K)
    ok = passes(stats, epsilons, procedure=procedure, delta=delta, n_rows=losses.shape[0])
    index, certified = select(ok, procedure=procedure)
    upper = None
    if procedure.startswith("ucb-"):
        upper = bounds.upper_bounds(
            losses, bound=_bound_of(procedure), delta=delta, loss_bound=loss_bound, bet_cap=bet_cap
        )
    return Selection(
        index=int(index[0]),
        certified=bool(certified[0]),
        empirical_risk=losses.mean(axis=-1),
        statistic=np.array(stats[0]),
        passed=ok[0],
        upper_bound=upper,
    )
