"""Threshold-selection procedures on loss tables, vectorised over repeated draws and targets.

A loss table has shape ``(..., K, n)``: row 0 is the full model (loss-free by construction),
rows ``1 .. K-1`` grow more aggressive. Every procedure is a :class:`Procedure`: it first
decides, for every target risk ``epsilon``, which rows *pass* its test
(:meth:`Procedure.passes`), then picks a row (:meth:`Procedure.select`):

=================  ==========================================================  ============
procedure          a row k >= 1 passes when                                    pick
=================  ==========================================================  ============
naive              mean loss <= epsilon (Eq. 9)                                last passing
crc                n/(n+1) mean + B/(n+1) <= epsilon on monotonised losses     last passing
crc-marginal       n/(n+1) mean + B/(n+1) <= epsilon on the losses (Eq. 10)    last passing
ucb-<bound>        UCB < epsilon, i.e. p-value < delta (Eqs. 11-12)            end of run
ltt                Hoeffding-Bentkus p-value <= delta                          end of run
ltt-bonferroni     Hoeffding-Bentkus p-value <= delta / (K - 1)                last passing
=================  ==========================================================  ============

"end of run" is fixed-sequence testing from the safe end: the last row of the unbroken run of
passing rows that starts at row 1 (for UCB this is Eq. 12's "every threshold between the full
model and the chosen one must pass"; for LTT it is the last rejected hypothesis). When no row
passes, the answer is row 0, the full model, and the selection is not certified.

*Monotonised losses* replace each sample's loss at row ``k`` by its maximum over rows
``0 .. k``. They are never below the real losses and are monotone along the grid sample by
sample, so conformal risk control needs no assumption about the network (Angelopoulos et al.,
2022, Theorem 1); ``crc-marginal`` is the paper's variant, valid only when the risk itself is
monotone along the grid (marginal monotonicity), which real tables can violate.

Guarantees (calibration and test data exchangeable; losses in [-B, B]):

* naive: none.
* crc: E[R] <= epsilon over calibration draws, with no other assumption.
* crc-marginal: E[R] <= epsilon over calibration draws, if the risk is monotone along the grid.
* ucb-*, ltt, ltt-bonferroni: P(R <= epsilon) >= 1 - delta over calibration draws. For the
  run-based procedures the argument is that of fixed-sequence testing: a violation needs the
  first row whose true risk exceeds epsilon to pass, which happens with probability at most
  delta; no monotonicity is needed for validity (it only makes the selection efficient).

**Order.** The Waudby-Smith-Ramdas bound is a betting process that reads the samples one after
another, so its value depends on their order; every other statistic here is a function of the
row means and does not. A file sorted by difficulty is not an exchangeable sequence, and the
WSR bound read in file order can then certify unsafe rows (with samples sorted from easy to
hard, nearly always). :func:`reading_order` gives the order in which order-dependent bounds
read the samples: a uniformly random permutation of the given order, drawn from a generator.
The guarantees then hold over the draw of the data *and of the permutation*, for exchangeable
samples in any file order, provided the permutation is drawn independently of the data
(a fresh seed). A fixed seed reused across calibrations is a fixed permutation: valid when
the file order is itself random (a fixed permutation of an exchangeable sequence is
exchangeable), not for sorted files. (Sorting the samples canonically before permuting, so
that a fixed seed would give the same answer for any file order, was tried and rejected: it
makes the order a function of the data, and a fixed seed then violated at 12.9% for
delta = 10% in the validity setting of tests/validity/test_order.py.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from exitguard.risk import bounds

Array = NDArray[np.float64]

_BOUND_NAMES = {
    "hoeffding": "Hoeffding",
    "hb": "Hoeffding-Bentkus",
    "wsr": "Waudby-Smith-Ramdas",
    "binomial": "exact binomial",
}


@dataclasses.dataclass(frozen=True)
class Procedure:
    """A threshold-selection procedure: a per-row test and a rule that picks a row.

    Attributes
    ----------
    name : str
        Canonical name, e.g. ``"ucb-wsr"``.
    test : {"mean", "crc", "p-value"}
        The per-row statistic: the mean loss, the CRC-adjusted mean, or a p-value of
        "risk >= epsilon" from ``bound``.
    rule : {"last", "run"}
        Pick the last passing row, or the end of the unbroken run of passing rows from row 1
        (fixed-sequence testing).
    guarantee : {"none", "expectation", "high-probability"}
        What the procedure promises (see the module docstring).
    bound : str or None
        ``hoeffding``, ``hb``, ``wsr`` or ``binomial`` for p-value tests.
    monotonise : bool
        Replace losses by their running maximum over rows before the test.
    bonferroni : bool
        Divide delta by the number of candidate rows (K - 1).
    needs_monotone_risk : bool
        Whether the guarantee assumes a risk monotone along the grid.
    """

    name: str
    test: Literal["mean", "crc", "p-value"]
    rule: Literal["last", "run"]
    guarantee: Literal["none", "expectation", "high-probability"]
    bound: str | None = None
    monotonise: bool = False
    bonferroni: bool = False
    needs_monotone_risk: bool = False

    @property
    def has_guarantee(self) -> bool:
        return self.guarantee != "none"

    @property
    def is_high_probability(self) -> bool:
        """True for procedures that bound P(R > epsilon) by delta (UCB and LTT)."""
        return self.guarantee == "high-probability"

    @property
    def order_dependent(self) -> bool:
        """True when the statistic depends on the order of the samples (the WSR bound)."""
        return self.bound == "wsr"

    @property
    def reports_upper_bound(self) -> bool:
        """True for UCB procedures (their statistic inverts into an upper bound on the risk)."""
        return self.name.startswith("ucb-")

    def guarantee_text(self, target_risk: float, delta: float) -> str:
        """The guarantee in words, for the given epsilon and delta."""
        eps = f"{target_risk:g}"
        if self.guarantee == "none":
            return (
                "none: the empirical calibration risk is at most the target, with no guarantee "
                "on new data"
            )
        if self.guarantee == "expectation":
            needs = (
                "needs exchangeable data and a risk monotone along the grid"
                if self.needs_monotone_risk
                else "on per-sample monotonised losses; needs exchangeable data"
            )
            return (
                f"E[R] <= {eps} in expectation over calibration sets (conformal risk control; "
                f"{needs})"
            )
        how = (
            f"upper confidence bound, {_BOUND_NAMES[str(self.bound)]}"
            if self.reports_upper_bound
            else "Learn-then-Test, "
            + ("Bonferroni" if self.bonferroni else "fixed-sequence testing")
        )
        return (
            f"P(R <= {eps}) >= {1 - delta:g} over calibration sets ({how}; needs exchangeable data)"
        )

    def check_losses(self, losses: Array, loss_bound: float) -> None:
        """Refuse losses the procedure's bound does not cover (non-0-1 losses for the exact
        binomial bound). Call it on the whole table before any split, so the answer does not
        depend on which samples a random split puts where."""
        if self.bound == "binomial":
            _check_binary(losses, loss_bound)

    def table_for_test(self, losses: Array) -> Array:
        """The losses the test reads: monotonised along the rows when the procedure says so."""
        return np.maximum.accumulate(losses, axis=-2) if self.monotonise else losses

    def statistic(
        self,
        losses: Array,
        target_risks: Array,
        *,
        delta: float,
        loss_bound: float,
        bet_cap: float | None = None,
    ) -> Array:
        """The per-row test statistic; losses (..., K, n) -> (..., E, K).

        mean: the mean loss; crc: the adjusted mean ``n/(n+1) mean + B/(n+1)``; p-value: the
        p-value of "risk >= epsilon" for each epsilon of ``target_risks`` (E,). Losses are read
        in the order given (see :func:`reading_order`).
        """
        table = self.table_for_test(losses)
        n = table.shape[-1]
        epsilons = np.asarray(target_risks, dtype=np.float64)  # (E,)
        if self.test in ("mean", "crc"):
            mean = table.mean(axis=-1)  # (..., K)
            value = mean if self.test == "mean" else (n * mean + loss_bound) / (n + 1)
            shape = (*value.shape[:-1], len(epsilons), value.shape[-1])
            return np.broadcast_to(value[..., None, :], shape)  # the same for every epsilon
        bound = str(self.bound)
        self.check_losses(table, loss_bound)
        if bound == "wsr":
            return _wsr_statistic(table, epsilons, delta=delta, loss_bound=loss_bound, cap=bet_cap)
        return bounds.p_values(
            table[..., None, :, :],
            epsilons[:, None],
            bound=bound,
            delta=delta,
            loss_bound=loss_bound,
            bet_cap=bet_cap,
        )  # (..., E, K)

    def passes(
        self, stats: Array, target_risks: Array, *, delta: float, n_rows: int
    ) -> NDArray[np.bool_]:
        """Which rows pass the test, from :meth:`statistic`; shape (..., E, K)."""
        epsilons = np.asarray(target_risks, dtype=np.float64)[:, None]  # (E, 1)
        if self.test in ("mean", "crc"):
            return stats <= epsilons
        if self.bonferroni:
            return stats <= delta / max(n_rows - 1, 1)
        if self.name.startswith("ltt"):
            return stats <= delta
        return stats < delta  # UCB < epsilon exactly when p-value(epsilon) < delta

    def select(self, ok: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        """The selected row and whether it is certified, from :meth:`passes`; shapes (...,).

        Row 0 (the full model) never needs to pass: it is the fallback.
        """
        candidates = ok[..., 1:]  # (..., K-1)
        if candidates.shape[-1] == 0:  # a grid holding only the full model
            return np.zeros(ok.shape[:-1], dtype=np.int64), np.zeros(ok.shape[:-1], dtype=bool)
        if self.rule == "run":
            index = np.cumprod(candidates, axis=-1).sum(axis=-1)  # length of the leading run
        else:
            n_candidates = candidates.shape[-1]
            last = n_candidates - np.argmax(candidates[..., ::-1], axis=-1)  # 1-based last True
            index = np.where(candidates.any(axis=-1), last, 0)
        index = index.astype(np.int64)
        certified = (index > 0) & self.has_guarantee
        return index, np.asarray(certified)

    def upper_bound(
        self, losses: Array, *, delta: float, loss_bound: float, bet_cap: float | None = None
    ) -> Array:
        """Upper confidence bound on the risk of every row of ``losses`` (..., n) (UCB only)."""
        if not self.reports_upper_bound:
            raise ValueError(f"procedure {self.name!r} has no upper confidence bound.")
        return bounds.upper_bounds(
            losses, bound=str(self.bound), delta=delta, loss_bound=loss_bound, bet_cap=bet_cap
        )


_WSR_CHUNK_ELEMENTS = 500_000  # losses per chunk of rows in the WSR statistic


def _wsr_statistic(
    table: Array, epsilons: Array, *, delta: float, loss_bound: float, cap: float | None
) -> Array:
    """WSR p-values (..., E, K), computed over chunks of rows.

    Rows are independent, so they are processed a chunk at a time: the working memory is about
    six arrays of the chunk's size (bets, running means and variances, wealth factors and their
    cumulative sums) on top of the table itself, whatever the table's size. Within a chunk the
    bets do not depend on epsilon: they are computed once, then one wealth pass per epsilon.
    """
    checked_cap = bounds._check_cap(cap, loss_bound)
    n_rows, n = table.shape[-2], table.shape[-1]
    lead = int(np.prod(table.shape[:-2], dtype=np.int64))
    rows_per_chunk = max(1, _WSR_CHUNK_ELEMENTS // max(1, lead * n))
    out = np.empty((*table.shape[:-2], len(epsilons), n_rows))  # (..., E, K)
    # A loop over chunks of rows only to bound memory; each chunk is fully vectorised.
    for start in range(0, n_rows, rows_per_chunk):
        part = table[..., start : start + rows_per_chunk, :]  # (..., k, n)
        bets = bounds.wsr_bets(part, delta=delta, loss_bound=loss_bound, bet_cap=checked_cap)
        for e, eps in enumerate(epsilons):  # the few target risks
            log_wealth = bounds.wsr_log_wealth(part, eps, bets=bets)  # (..., k)
            out[..., e, start : start + rows_per_chunk] = np.minimum(1.0, np.exp(-log_wealth))
    return out


_ALL = (
    Procedure("naive", test="mean", rule="last", guarantee="none"),
    Procedure("crc", test="crc", rule="last", guarantee="expectation", monotonise=True),
    Procedure(
        "crc-marginal", test="crc", rule="last", guarantee="expectation", needs_monotone_risk=True
    ),
    *(
        Procedure(f"ucb-{b}", test="p-value", rule="run", guarantee="high-probability", bound=b)
        for b in ("hoeffding", "hb", "wsr", "binomial")
    ),
    Procedure("ltt", test="p-value", rule="run", guarantee="high-probability", bound="hb"),
    Procedure(
        "ltt-bonferroni",
        test="p-value",
        rule="last",
        guarantee="high-probability",
        bound="hb",
        bonferroni=True,
    ),
)
REGISTRY: dict[str, Procedure] = {p.name: p for p in _ALL}
PROCEDURES = tuple(REGISTRY)
"""Canonical procedure names."""

ALIASES = {"ucb": "ucb-wsr", "ltt-hb": "ltt", "ltt-fixed-sequence": "ltt"}


def get_procedure(procedure: str | Procedure) -> Procedure:
    """The :class:`Procedure` for a name or alias (``"ucb"`` means ``"ucb-wsr"``), or itself."""
    if isinstance(procedure, Procedure):
        return procedure
    name = ALIASES.get(procedure, procedure) if isinstance(procedure, str) else procedure
    if name not in REGISTRY:
        allowed = ", ".join(repr(p) for p in (*PROCEDURES, *ALIASES))
        raise ValueError(f"`procedure` must be one of {allowed}; got {procedure!r}.")
    return REGISTRY[str(name)]


def canonical_procedure(procedure: str | Procedure) -> str:
    """The canonical name of a procedure (``"ucb"`` means ``"ucb-wsr"``)."""
    return get_procedure(procedure).name


def has_guarantee(procedure: str | Procedure) -> bool:
    return get_procedure(procedure).has_guarantee


def is_high_probability(procedure: str | Procedure) -> bool:
    """True for procedures that bound P(R > epsilon) by delta (UCB and LTT)."""
    return get_procedure(procedure).is_high_probability


def _check_binary(losses: Array, loss_bound: float) -> None:
    unit = bounds.to_unit_interval(losses, loss_bound)
    if not np.all((unit == 0.0) | (unit == 1.0)):
        raise ValueError(
            "procedure 'ucb-binomial' needs 0-1 losses (after clipping at 0 and dividing by "
            "`loss_bound`); got other values. Use 'ucb-wsr' or 'ucb-hb' for general losses."
        )


# ------------------------------------------------------------------------- reading order


def reading_order(
    losses: Array, generators: np.random.Generator | Sequence[np.random.Generator]
) -> NDArray[np.int64]:
    """The order in which order-dependent bounds read the samples; losses (..., K, n) -> (..., n).

    A uniformly random permutation of the given order, from one generator per leading index
    of ``losses`` (in C order). Drawn with a seed chosen independently of the data, the
    samples read in this order are a uniformly random arrangement of the calibration set,
    whatever order the file had.
    """
    n = losses.shape[-1]
    lead = losses.shape[:-2]
    gens = [generators] if isinstance(generators, np.random.Generator) else list(generators)
    count = int(np.prod(lead, dtype=np.int64))
    if len(gens) != count:
        raise ValueError(
            f"`generators` must hold one generator per table ({count}); got {len(gens)}."
        )
    # One permutation per table: a loop over generators (each draw is a few microseconds).
    return np.stack([g.permutation(n) for g in gens]).reshape(*lead, n)  # (..., n)


def in_order(losses: Array, order: NDArray[np.int64]) -> Array:
    """``losses`` (..., K, n) with their samples read in ``order`` (..., n)."""
    return np.take_along_axis(losses, order[..., None, :], axis=-1)


# ------------------------------------------------------------- functional wrappers (arrays)


def statistics(
    losses: Array,
    target_risks: Array,
    *,
    procedure: str | Procedure,
    delta: float,
    loss_bound: float,
    bet_cap: float | None = None,
) -> Array:
    """The per-row test statistic of a procedure; (..., K, n) -> (..., E, K)."""
    return get_procedure(procedure).statistic(
        losses, target_risks, delta=delta, loss_bound=loss_bound, bet_cap=bet_cap
    )


def passes(
    stats: Array, target_risks: Array, *, procedure: str | Procedure, delta: float, n_rows: int
) -> NDArray[np.bool_]:
    """Which rows pass the procedure's test, from :func:`statistics`; shape (..., E, K)."""
    return get_procedure(procedure).passes(stats, target_risks, delta=delta, n_rows=n_rows)


def select(
    ok: NDArray[np.bool_], *, procedure: str | Procedure
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """The selected row and whether it is certified, from :func:`passes`; shapes (...,)."""
    return get_procedure(procedure).select(ok)


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
        Mean calibration loss of every row (of the losses as given, not monotonised).
    statistic : array (K,)
        The procedure's per-row statistic at this target risk (see :meth:`Procedure.statistic`).
    passed : bool array (K,)
        Which rows passed the test.
    upper_bound : float or None
        Upper confidence bound on the risk of the selected row (UCB procedures only), from the
        same samples in the same order as the test.
    """

    index: int
    certified: bool
    empirical_risk: Array
    statistic: Array
    passed: NDArray[np.bool_]
    upper_bound: float | None

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
    procedure: str | Procedure,
    loss_bound: float,
    bet_cap: float | None = None,
) -> Selection:
    """Run one procedure on a validated table ``losses`` (K, n), read in the given order."""
    chosen = get_procedure(procedure)
    epsilons = np.array([target_risk])
    stats = chosen.statistic(
        losses, epsilons, delta=delta, loss_bound=loss_bound, bet_cap=bet_cap
    )  # (1, K)
    ok = chosen.passes(stats, epsilons, delta=delta, n_rows=losses.shape[0])
    index, certified = chosen.select(ok)
    row = int(index[0])
    upper = None
    if chosen.reports_upper_bound:
        # Only the selected row's bound is reported: one bisection on one row, not K.
        upper = float(
            chosen.upper_bound(losses[row], delta=delta, loss_bound=loss_bound, bet_cap=bet_cap)
        )
    return Selection(
        index=row,
        certified=bool(certified[0]),
        empirical_risk=losses.mean(axis=-1),
        statistic=np.array(stats[0]),
        passed=ok[0],
        upper_bound=upper,
    )
