"""`ExitPolicy`: the calibrated outcome, serialisable as JSON.

A policy decides exits in one of three ways (:meth:`ExitPolicy.exit_thresholds` gives the
per-exit thresholds of each):

* a scalar ``threshold``: a sample leaves at the first exit whose confidence is >= it;
* a threshold vector ``thresholds``, one per exit but the last (``inf`` disables an exit);
* a threshold function ``threshold_function`` of the scalar ``threshold`` (a
  :class:`~exitguard.risk.configurations.ThresholdFamily`, e.g. a decay over the exits).

A policy promises one risk (the scalar fields ``risk``, ``target_risk``, ...) or several at
once (``risks``, with the first repeated in the scalar fields), and records whether its
configuration was certified along a natural order (a grid) or by Pareto Testing (``pareto``).

Files: schema version 2 for a policy with one scalar threshold and one mean risk (as written
by earlier versions, which still load); version 3 when any of ``thresholds``,
``threshold_function``, ``risks``, ``pareto``, ``n_opt`` is set (those fields are written
only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard._files import atomic_write_text, load_json
from exitguard.risk._validation import check_class_indices, check_exit_cost, check_unit_scores
from exitguard.risk.confidence import CONFIDENCES, as_probabilities
from exitguard.risk.confidence import confidences as confidence_scores
from exitguard.risk.configurations import ThresholdFamily
from exitguard.risk.exits import check_threshold_vector, check_thresholds, exit_index
from exitguard.risk.losses import RISKS, get_risk, per_exit_losses, per_exit_prediction_losses
from exitguard.risk.procedures import Procedure, get_procedure

SCHEMA_VERSION = 3
"""The schema version of policies that use threshold vectors, functions or several risks."""
_CLASSIC_VERSION = 2  # a scalar threshold and one mean risk: the format of earlier versions
_SCHEMA_NAME = "exitguard.ExitPolicy"
_NEW_FIELDS = ("thresholds", "threshold_function", "risks", "pareto", "n_opt")
PARETO_SOURCES = ("split", "external")


class PolicyFileError(ValueError):
    """A policy file that cannot be read as an exitguard policy."""


def fingerprint(*arrays: NDArray[Any]) -> str:
    """A short, stable hash of arrays (shape, dtype and bytes), e.g. of the calibration data."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(str(contiguous.shape).encode())
        digest.update(str(contiguous.dtype).encode())
        digest.update(memoryview(contiguous).cast("B"))  # no copy of the data
    return digest.hexdigest()[:16]


def guarantee_text(procedure: str, target_risk: float, delta: float) -> str:
    """The guarantee of a procedure, in words, for the given epsilon and delta."""
    return get_procedure(procedure).guarantee_text(target_risk, delta)


@dataclasses.dataclass(frozen=True)
class RiskPromise:
    """One risk of a policy that promises several (or a tail risk): the promise and its test.

    Attributes
    ----------
    risk : str
        Name of the per-sample loss (e.g. ``"prediction_gap"``).
    target_risk : float
        Epsilon in (0, 1).
    loss_bound : float
        B: the losses (relative to the full model) lie in [-B, B]; 1 for a tail risk.
    empirical_risk : float
        Mean loss of the policy's configuration on the data it was tested on.
    p_value, upper_bound : float or None
        Its p-value of "risk >= epsilon" and (UCB procedures) the upper confidence bound.
    tolerance : float or None
        For a tail (exceedance) risk, ``t``: the promise is ``P(loss > t) <= target_risk``;
        None for a mean risk (``E[loss] <= target_risk``).
    """

    risk: str
    target_risk: float
    loss_bound: float
    empirical_risk: float
    p_value: float | None = None
    upper_bound: float | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        _optional_text(self.risk, "risks[].risk")
        if self.risk is None:
            raise ValueError("`risks[].risk` must name the risk; got null.")
        _number(self.target_risk, "risks[].target_risk", low=0.0, high=1.0, closed=False)
        _number(self.loss_bound, "risks[].loss_bound", low=1e-12, high=1e12)
        _number(
            self.empirical_risk,
            "risks[].empirical_risk",
            low=-self.loss_bound,
            high=self.loss_bound,
        )
        if self.p_value is not None:
            _number(self.p_value, "risks[].p_value", low=0.0, high=1.0)
        if self.upper_bound is not None:
            _number(self.upper_bound, "risks[].upper_bound", low=-1e300, high=1e300)
        if self.tolerance is not None:
            _number(self.tolerance, "risks[].tolerance", low=0.0, high=1e12)

    @property
    def label(self) -> str:
        """``R[name]`` for a mean risk, ``P(name > t)`` for a tail risk."""
        if self.tolerance is None:
            return f"R[{self.risk}]"
        return f"P({self.risk} > {self.tolerance:g})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RiskPromise:
        if not isinstance(data, Mapping):
            raise ValueError(f"`risks` must hold JSON objects; got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted({"risk", "target_risk", "loss_bound", "empirical_risk"} - set(data))
        if unknown or missing:
            raise ValueError(
                f"`risks` entries must have the fields {sorted(names)}; got unknown "
                f"{unknown} and missing {missing}."
            )
        return cls(**data)


def multi_guarantee_text(
    procedure: str | Procedure,
    risks: tuple[RiskPromise, ...],
    delta: float,
    pareto: str | None,
) -> str:
    """The guarantee of a policy with several risks, or certified by Pareto Testing.

    Every risk at once: ``P(every risk <= its epsilon) >= 1 - delta`` over calibration sets.
    """
    chosen = get_procedure(procedure)
    promise = " and ".join(f"{r.label} <= {r.target_risk:g}" for r in risks)
    if pareto == "split":
        how = "Pareto Testing: order learnt on an optimisation split, fixed-sequence testing"
    elif pareto == "external":
        how = "Pareto Testing: order learnt on an external optimisation set, fixed-sequence testing"
    else:
        how = "fixed-sequence testing along the grid"
    return (
        f"P({promise}) >= {1 - delta:g} over calibration sets ({how} of every risk with "
        f"{chosen.name} p-values; needs exchangeable data)"
    )


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """A calibrated early-exit policy.

    A sample leaves at the first exit whose confidence is >= ``threshold``; ``threshold``
    is ``inf`` for the full model (never exit early). With a threshold vector, at the first
    exit ``l`` whose confidence is >= ``thresholds[l]``; with a threshold function, the vector
    is ``threshold_function`` at ``threshold`` (see :meth:`exit_thresholds`).

    Attributes
    ----------
    threshold : float or None
        The exit threshold (``math.inf`` = never exit early), or the scalar of a threshold
        function; ``None`` for a threshold vector, or when the calibration table carried no
        thresholds, in which case ``index`` identifies the policy.
    index : int
        Row of the calibration grid that was selected (0 = the full model); for Pareto
        Testing, the position of the configuration in the tested order (0 = the full
        model).
    procedure : str
        Canonical procedure name, e.g. ``"ucb-wsr"``.
    guarantee : str
        What is promised, in words.
    target_risk, delta : float
        Epsilon and delta.
    n : int
        Number of calibration samples.
    empirical_risk : float
        Mean calibration loss at the selected row.
    upper_bound : float or None
        The procedure's bound on the risk at the selected row (UCB procedures), the adjusted
        CRC risk, or None.
    p_value : float or None
        The p-value of the selected row (LTT), else None.
    expected_cost : float or None
        Mean cost of the calibration samples under the policy, if a cost was given.
    full_cost : float or None
        The same for the full model (row 0).
    certified : bool
        True when the procedure certified an early-exit row. False means nothing could be
        certified (or the procedure gives no guarantee) and the policy is the full model or
        the naive choice.
    loss_bound : float
        B: losses were in [-B, B].
    risk : str or None
        Name of the risk that was controlled, when known.
    confidence : str or None
        Name of the confidence measure the threshold applies to, when known.
    n_exits : int or None
        Number of exits of the network, when known.
    model_fingerprint : str or None
        Architecture fingerprint of the network, when known.
    data_fingerprint : str
        Hash of the calibration loss table.
    sample_order : {"random", "given"} or None
        How an order-dependent bound (WSR) read the calibration samples: in a seeded random
        permutation (``order_seed``) or in the order given; None when the procedure does not
        depend on the order.
    order_seed : int or None
        Seed of the random permutation (``sample_order="random"``), to repeat the calibration.
    thresholds : tuple of float or None
        A threshold vector, one per exit but the last (``inf`` disables an exit; all ``inf``
        is the full model); ``threshold`` is then None.
    threshold_function : ThresholdFamily or None
        A threshold function of the scalar ``threshold`` (its thresholds per exit:
        :meth:`ThresholdFamily.vector`).
    risks : tuple of RiskPromise
        Every risk promised, when there are several or one is a tail risk (the first is
        repeated in ``risk``, ``target_risk``, ``loss_bound``, ``empirical_risk``,
        ``p_value`` and ``upper_bound``); empty for one mean risk.
    pareto : {"split", "external"} or None
        Certified by Pareto Testing with the order learnt on a split of the calibration data
        or on an external optimisation set; None for a grid tested in its natural order.
    n_opt : int or None
        Samples that learnt the order (Pareto Testing): part of ``n`` for ``"split"``, others
        for ``"external"``.
    """

    threshold: float | None
    index: int
    procedure: str
    guarantee: str
    target_risk: float
    delta: float
    n: int
    empirical_risk: float
    upper_bound: float | None
    p_value: float | None
    expected_cost: float | None
    full_cost: float | None
    certified: bool
    loss_bound: float
    risk: str | None = None
    confidence: str | None = None
    n_exits: int | None = None
    model_fingerprint: str | None = None
    data_fingerprint: str = ""
    sample_order: str | None = None
    order_seed: int | None = None
    thresholds: tuple[float, ...] | None = None
    threshold_function: ThresholdFamily | None = None
    risks: tuple[RiskPromise, ...] = ()
    pareto: str | None = None
    n_opt: int | None = None

    @property
    def is_full_model(self) -> bool:
        """True when the policy never exits early."""
        if self.thresholds is not None:
            return self.index == 0 or all(math.isinf(t) for t in self.thresholds)
        return self.index == 0 or (self.threshold is not None and math.isinf(self.threshold))

    @property
    def kind(self) -> str:
        """``"scalar"``, ``"vector"`` or ``"function"``: how the policy decides exits."""
        if self.thresholds is not None:
            return "vector"
        if self.threshold_function is not None:
            return "function"
        return "scalar"

    @property
    def promises(self) -> tuple[RiskPromise, ...]:
        """Every risk promised (one for a classic policy, built from the scalar fields)."""
        if self.risks:
            return self.risks
        return (
            RiskPromise(
                risk=self.risk if self.risk is not None else "risk",
                target_risk=self.target_risk,
                loss_bound=self.loss_bound,
                empirical_risk=self.empirical_risk,
                p_value=self.p_value,
                upper_bound=self.upper_bound,
            ),
        )

    def exit_thresholds(self, n_exits: int | None = None) -> NDArray[np.float64]:
        """The threshold of every exit but the last, float64 (L - 1,); ``inf``: never there.

        A scalar threshold is repeated, a vector returned as it is, a function evaluated at
        ``threshold``. ``n_exits`` defaults to the policy's (required when it records none
        and the policy is not a vector).

        Examples
        --------
        >>> policy = ExitPolicy.from_thresholds([0.9, math.inf, 0.6], risk="prediction_gap")
        >>> policy.exit_thresholds()
        array([0.9, inf, 0.6])
        """
        count = n_exits if n_exits is not None else self.n_exits
        if self.thresholds is not None:
            count = count if count is not None else len(self.thresholds) + 1
            self._check_exits(count)
            return check_threshold_vector(self.thresholds, count)
        if count is None:
            raise ValueError(
                "`n_exits` is required: this policy records no number of exits "
                "(bind it to a network, or pass n_exits=)."
            )
        self._check_exits(count)
        if self.threshold is None:
            if not self.is_full_model:
                raise ValueError(
                    f"this policy selected row {self.index} of a table without thresholds, so "
                    "it has no exit thresholds; calibrate with `thresholds` (or from outputs)."
                )
            return np.full(count - 1, math.inf)
        if self.threshold_function is not None:
            return self.threshold_function.vector(self.threshold, count)
        return np.full(count - 1, float(self.threshold))

    def describe_thresholds(self) -> str:
        """The thresholds in words: ``never (full model)``, ``0.83``, ``(0.9, never, 0.7)``."""
        if self.is_full_model:
            return "never (full model)"
        if self.thresholds is not None:
            return "(" + ", ".join(_threshold_word(t) for t in self.thresholds) + ")"
        if self.threshold is None:
            return f"row {self.index}"
        if self.threshold_function is not None:
            f = self.threshold_function
            return f"{f.kind}(tau={f.tau:g}) at {self.threshold:.4g}"
        return f"{self.threshold:.4g}"

    @classmethod
    def from_thresholds(
        cls,
        thresholds: ArrayLike | float,
        *,
        risk: str | None = None,
        confidence: str | None = None,
        n_exits: int | None = None,
        model_fingerprint: str | None = None,
    ) -> ExitPolicy:
        """An uncalibrated policy from thresholds chosen by hand (``procedure="naive"``).

        ``thresholds`` is one float (a scalar threshold) or one per exit but the last (a
        vector). It promises nothing (``certified=False``); use it to run a network under
        thresholds you picked, never as a guarantee.
        """
        values = check_thresholds(thresholds, name="thresholds")
        vector = None if values.ndim == 0 else tuple(float(v) for v in values.reshape(-1))
        if vector is not None:
            count = n_exits if n_exits is not None else len(vector) + 1
            check_threshold_vector(values, count, name="thresholds")
        scalar = None if vector is not None else float(values)
        full = all(math.isinf(v) for v in vector) if vector is not None else math.isinf(scalar)
        return cls(
            threshold=scalar,
            index=0 if full else 1,
            procedure="naive",
            guarantee=get_procedure("naive").guarantee_text(0.5, 0.5),
            target_risk=0.5,
            delta=0.5,
            n=2,
            empirical_risk=0.0,
            upper_bound=None,
            p_value=None,
            expected_cost=None,
            full_cost=None,
            certified=False,
            loss_bound=1.0,
            risk=risk,
            confidence=confidence,
            n_exits=n_exits,
            model_fingerprint=model_fingerprint,
            thresholds=vector,
        )

    @property
    def relative_saving(self) -> float | None:
        """1 - expected_cost / full_cost, when costs are known."""
        if self.expected_cost is None or not self.full_cost:
            return None
        return 1.0 - self.expected_cost / self.full_cost

    def with_model(
        self, *, n_exits: int, model_fingerprint: str | None = None, confidence: str | None = None
    ) -> ExitPolicy:
        """A copy that records which network (and confidence measure) it belongs to."""
        return dataclasses.replace(
            self,
            n_exits=n_exits,
            model_fingerprint=model_fingerprint,
            confidence=confidence if confidence is not None else self.confidence,
        )

    def apply(
        self,
        exit_probs: ArrayLike | None = None,
        labels: ArrayLike | None = None,
        *,
        confidences: ArrayLike | None = None,
        predictions: ArrayLike | None = None,
        confidence: str | None = None,
        from_logits: bool = False,
        exit_cost: ArrayLike | None = None,
        n_classes: int | None = None,
        rng: np.random.Generator | int | None = None,
    ) -> AppliedPolicy:
        """Apply the policy to saved per-exit outputs of new samples.

        Give either ``exit_probs`` (n, L, C) (or logits with ``from_logits=True``), scored
        with the policy's confidence measure, or ``confidences`` (n, L) with ``predictions``
        (n, L), saved outputs whose confidence is named ``confidence`` (default: the
        policy's). Outputs with another number of exits or another confidence than the
        policy's are refused.

        Returns
        -------
        AppliedPolicy
            The exit, prediction and cost of every sample, and its loss relative to the full
            model when the policy's risk can be computed from these outputs (labels given for
            gap risks; probabilities for Brier risks).
        """
        if self.threshold is None and self.thresholds is None:
            raise ValueError(
                f"this policy selected row {self.index} of a table without thresholds, so it "
                "cannot be applied to outputs; calibrate with `thresholds` (or from outputs)."
            )
        if (exit_probs is None) == (confidences is None):
            raise ValueError(
                "give either `exit_probs` (n, L, C) or `confidences` (n, L) with `predictions`."
            )
        risk = get_risk(self.risk, rng=rng) if self.risk in RISKS else None
        per_exit: NDArray[np.float64] | None = None
        if exit_probs is not None:
            probs = as_probabilities(exit_probs, from_logits=from_logits)  # (n, L, C)
            if self.confidence not in CONFIDENCES:
                raise ValueError(
                    f"the policy's confidence {self.confidence!r} is not one exitguard can "
                    "compute from probabilities; pass the saved `confidences` and "
                    "`predictions` instead."
                )
            self._check_exits(probs.shape[1])
            scores = confidence_scores(probs, measure=str(self.confidence))  # (n, L)
            chosen = probs.argmax(axis=-1)  # (n, L)
            if risk is not None and (labels is not None or not risk.needs_labels):
                per_exit = per_exit_losses(probs, labels, risk)  # (n, L)
        else:
            name = confidence if confidence is not None else self.confidence
            if self.confidence is not None and name != self.confidence:
                raise ValueError(
                    f"`confidence` must match the policy's confidence {self.confidence!r}; got "
                    f"{name!r} (a threshold only means something for the score it was "
                    "calibrated on)."
                )
            scores = check_unit_scores(confidences, "confidences", ndim=2)  # (n, L)
            if predictions is None:
                raise ValueError("`predictions` (n, L) are required with `confidences`.")
            self._check_exits(scores.shape[1])
            chosen = check_class_indices(
                predictions, "predictions", shape=scores.shape, n_classes=n_classes
            )
            if (
                risk is not None
                and risk.prediction_loss is not None
                and (labels is not None or not risk.needs_labels)
            ):
                per_exit = per_exit_prediction_losses(chosen, labels, risk, n_classes=n_classes)
        limits = self.exit_thresholds(scores.shape[1])  # (L-1,)
        exits = exit_index(scores, limits)  # (n,) the core's rule
        rows = np.arange(len(exits))
        losses = None
        if per_exit is not None:
            losses = per_exit[rows, exits] - per_exit[:, -1]  # (n,)
            tolerance = self.promises[0].tolerance
            if tolerance is not None:  # a tail risk: the indicator of the loss above t
                losses = (losses > tolerance).astype(np.float64)
        per_exit_cost = check_exit_cost(exit_cost, scores.shape[1])  # (L,)
        return AppliedPolicy(
            exits=exits,
            predictions=chosen[rows, exits],
            losses=losses,
            cost=per_exit_cost[exits],
            full_cost=float(per_exit_cost[-1]),
            n_exits=int(scores.shape[1]),
            risk=self.risk,
            target_risk=self.target_risk,
        )

    def _check_exits(self, n_exits: int) -> None:
        if self.n_exits is not None and n_exits != self.n_exits:
            raise ValueError(
                f"the outputs have {n_exits} exits but the policy was calibrated for "
                f"{self.n_exits}."
            )

    def __repr__(self) -> str:
        name = "thresholds" if self.thresholds is not None else "threshold"
        parts = [f"{name}={self.describe_thresholds()}", f"procedure={self.procedure!r}"]
        if self.risks:
            parts.append(
                "risks=[" + ", ".join(f"{r.label} <= {r.target_risk:g}" for r in self.risks) + "]"
            )
        else:
            parts.append(f"target_risk={self.target_risk:g}")
        if self.pareto is not None:
            parts.append(f"pareto={self.pareto!r}")
        parts += [
            f"delta={self.delta:g}",
            f"n={self.n}",
            f"empirical_risk={self.empirical_risk:.4g}",
            f"certified={self.certified}",
        ]
        if self.expected_cost is not None:
            parts.append(f"expected_cost={self.expected_cost:.4g}")
        return f"ExitPolicy({', '.join(parts)})"

    def __post_init__(self) -> None:
        if self.thresholds is not None:
            if isinstance(self.thresholds, (str, bytes)) or not hasattr(self.thresholds, "__len__"):
                raise TypeError(
                    "`thresholds` must be a sequence of floats (one per exit but the last); "
                    f"got {self.thresholds!r}."
                )
            values = tuple(
                float(v)
                if isinstance(v, (int, float, np.integer, np.floating))
                and not isinstance(v, (bool, np.bool_))
                else v
                for v in self.thresholds
            )
            object.__setattr__(self, "thresholds", values)
        if not isinstance(self.risks, tuple):
            if isinstance(self.risks, (str, bytes)) or not hasattr(self.risks, "__len__"):
                raise TypeError(f"`risks` must be a sequence of RiskPromise; got {self.risks!r}.")
            object.__setattr__(self, "risks", tuple(self.risks))
        _check_fields(self)

    def to_dict(self, *, key: bytes | str | None = None) -> dict[str, Any]:
        """A JSON-ready dict with its content digest (and signature, with a key).

        The full model's threshold is written as ``"never"``. ``digest`` is the SHA-256 of the
        canonical JSON of every other field; with ``key`` (or ``$EXITGUARD_POLICY_KEY``),
        ``signature`` is an HMAC-SHA256 of the same bytes (see :meth:`load`).
        """
        payload = self._payload()
        canonical = _canonical(payload)
        data = {**payload, "digest": self.digest}
        secret = _key(key)
        if secret is not None:
            data["signature"] = "hmac-sha256:" + hmac.new(secret, canonical, "sha256").hexdigest()
        return data

    @property
    def digest(self) -> str:
        """``"sha256:..."`` of the policy's canonical content (what its files carry)."""
        return "sha256:" + hashlib.sha256(_canonical(self._payload())).hexdigest()

    def full_model(self) -> ExitPolicy:
        """The same promise with the full model: never exit early (the safe fallback)."""
        vector = None
        if self.thresholds is not None:
            vector = tuple(math.inf for _ in self.thresholds)
        risks = tuple(
            dataclasses.replace(r, empirical_risk=0.0, p_value=None, upper_bound=None)
            for r in self.risks
        )
        return dataclasses.replace(
            self,
            threshold=None if vector is not None else math.inf,
            thresholds=vector,
            index=0,
            certified=False,
            empirical_risk=0.0,
            upper_bound=None,
            p_value=None,
            expected_cost=self.full_cost,
            risks=risks,
        )

    def _payload(self) -> dict[str, Any]:
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _NEW_FIELDS
        }
        if self.threshold is not None and math.isinf(self.threshold):
            data["threshold"] = "never"
        extra: dict[str, Any] = {}
        if self.thresholds is not None:
            extra["thresholds"] = [_threshold_word(t, json=True) for t in self.thresholds]
        if self.threshold_function is not None:
            extra["threshold_function"] = self.threshold_function.to_dict()
        if self.risks:
            extra["risks"] = [r.to_dict() for r in self.risks]
        if self.pareto is not None:
            extra["pareto"] = self.pareto
        if self.n_opt is not None:
            extra["n_opt"] = self.n_opt
        version = SCHEMA_VERSION if extra else _CLASSIC_VERSION
        return {"schema": _SCHEMA_NAME, "schema_version": version, **data, **extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, key: bytes | str | None = None) -> ExitPolicy:
        """Rebuild a policy from :meth:`to_dict` output, refusing anything inconsistent.

        Checks, in order: the schema and version; no unknown or missing fields; the content
        digest (a policy edited by hand, or damaged, is refused); with a key (argument or
        ``$EXITGUARD_POLICY_KEY``), the HMAC signature; then every field's type and range and
        their consistency (see :class:`ExitPolicy`): a known procedure, ``certified`` only
        for a procedure with a guarantee whose bound is below the target, ``n >= 2``, finite
        numbers, the full model's threshold exactly at row 0.
        """
        if not isinstance(data, Mapping):
            raise PolicyFileError(f"a policy must be a JSON object; got {type(data).__name__}.")
        if data.get("schema") != _SCHEMA_NAME:
            raise PolicyFileError(
                f"not an exitguard policy: `schema` must be {_SCHEMA_NAME!r}; "
                f"got {data.get('schema')!r}."
            )
        version = data.get("schema_version")
        if version not in (_CLASSIC_VERSION, SCHEMA_VERSION) or isinstance(version, bool):
            raise PolicyFileError(
                f"`schema_version` must be {_CLASSIC_VERSION} or {SCHEMA_VERSION}; got "
                f"{version!r}. Recalibrate with this version of exitguard."
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        envelope = {"schema", "schema_version", "digest", "signature"}
        allowed = set(fields) if version == SCHEMA_VERSION else set(fields) - set(_NEW_FIELDS)
        unknown = sorted(set(data) - allowed - envelope)
        if unknown:
            raise PolicyFileError(
                f"unknown policy fields for schema version {version}: {', '.join(unknown)}."
            )
        missing = sorted(set(fields) - set(_NEW_FIELDS) - set(data))
        if missing:
            raise PolicyFileError(f"missing policy fields: {', '.join(missing)}.")
        payload = {k: v for k, v in data.items() if k not in ("digest", "signature")}
        try:
            canonical = _canonical(payload)
        except (TypeError, ValueError) as error:
            raise PolicyFileError(f"a policy must hold only JSON values: {error}.") from error
        digest = data.get("digest")
        if digest != "sha256:" + hashlib.sha256(canonical).hexdigest():
            raise PolicyFileError(
                "the policy's fields do not match its `digest`: the file was edited or damaged "
                f"after it was written (digest {digest!r}). Recalibrate rather than edit a policy."
            )
        secret = _key(key)
        if secret is not None:
            signature = data.get("signature")
            expected = "hmac-sha256:" + hmac.new(secret, canonical, "sha256").hexdigest()
            if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
                raise PolicyFileError(
                    "the policy's `signature` is missing or does not match the key: it was not "
                    "written by a holder of this key, or was changed since."
                )
        values = {name: data[name] for name in fields if name in data}
        if values["threshold"] == "never":
            values["threshold"] = math.inf
        try:
            if "thresholds" in values:
                values["thresholds"] = _vector_from_json(values["thresholds"])
            if "threshold_function" in values:
                function = values["threshold_function"]
                if not isinstance(function, Mapping) or set(function) != {"kind", "tau"}:
                    raise ValueError(
                        '`threshold_function` must be an object {"kind": ..., "tau": ...}; '
                        f"got {function!r}."
                    )
                values["threshold_function"] = ThresholdFamily.from_dict(dict(function))
            if "risks" in values:
                if not isinstance(values["risks"], list):
                    raise ValueError(f"`risks` must be a list; got {values['risks']!r}.")
                values["risks"] = tuple(RiskPromise.from_dict(r) for r in values["risks"])
            policy = cls(**values)
        except (TypeError, ValueError) as error:
            raise PolicyFileError(str(error)) from error
        if version == SCHEMA_VERSION and _canonical(policy._payload()) != canonical:
            raise PolicyFileError(
                "the policy is not in the form exitguard writes (a field at its default value, "
                f"or the schema version of another format); schema version {version}."
            )
        return policy

    def to_json(self, *, key: bytes | str | None = None) -> str:
        return json.dumps(self.to_dict(key=key), indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike[str], *, key: bytes | str | None = None) -> Path:
        """Write the policy as JSON, atomically (see :mod:`exitguard._files`).

        A failed write leaves any old file intact; a target that is a link or not a regular
        file is refused. With ``key`` (or ``$EXITGUARD_POLICY_KEY``) the file is signed.
        """
        return atomic_write_text(path, self.to_json(key=key) + "\n", argument="policy file")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key: bytes | str | None = None) -> ExitPolicy:
        """Read a policy written by :meth:`save`, checking its digest (and signature).

        Files larger than 1 MiB, nested deeper than 8 levels, with duplicate keys, NaN or
        Infinity, or that are not regular files (a FIFO, a device) are refused before they are
        parsed. With ``key`` (or ``$EXITGUARD_POLICY_KEY``) an unsigned or wrongly signed
        policy is refused.
        """
        try:
            data = load_json(
                path, max_bytes=_MAX_BYTES, max_depth=_MAX_DEPTH, argument="policy file"
            )
        except ValueError as error:
            raise PolicyFileError(str(error)) from error
        return cls.from_dict(data, key=key)


_MAX_BYTES = 1 << 20
_MAX_DEPTH = 8
_KEY_VARIABLE = "EXITGUARD_POLICY_KEY"


def _canonical(payload: Mapping[str, Any]) -> bytes:
    """The bytes the digest and the signature cover: sorted keys, no spaces, ASCII."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _key(key: bytes | str | None) -> bytes | None:
    if key is None:
        key = os.environ.get(_KEY_VARIABLE) or None
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError(
            "a policy signing key must hold at least 16 bytes (e.g. `openssl rand -hex 32`); "
            f"got {len(key) if isinstance(key, bytes) else type(key).__name__}."
        )
    return key


def _number(value: Any, name: str, *, low: float, high: float, closed: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
    inside = low <= value <= high if closed else low < value < high
    if not inside:
        brackets = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
        raise ValueError(f"`{name}` must lie in {brackets}; got {value!r}.")


def _threshold_word(value: float, *, json: bool = False) -> Any:
    """``"never"`` for ``inf``; else the number (as a float for JSON, as text otherwise)."""
    if math.isinf(value):
        return "never"
    return float(value) if json else f"{value:.4g}"


def _vector_from_json(values: Any) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise ValueError(
            '`thresholds` must be a non-empty list of numbers in [0, 1] or "never"; got '
            f"{values!r}."
        )
    out = []
    for value in values:
        if value == "never":
            out.append(math.inf)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f'`thresholds` must hold numbers in [0, 1] or "never"; got {value!r}.')
        else:
            out.append(float(value))
    return tuple(out)


def _optional_text(value: Any, name: str) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > 200):
        raise ValueError(
            f"`{name}` must be a string of at most 200 characters or null; got {value!r}."
        )


def _check_fields(policy: ExitPolicy) -> None:
    """Types, ranges and consistency of every field (raises ValueError or TypeError)."""
    p = policy
    try:
        procedure = get_procedure(p.procedure)
    except ValueError as error:
        raise ValueError(f"`procedure`: {error}") from error
    if procedure.name != p.procedure:
        raise ValueError(
            f"`procedure` must be a canonical name ({procedure.name!r}); got {p.procedure!r}."
        )
    _number(p.target_risk, "target_risk", low=0.0, high=1.0, closed=False)
    _number(p.delta, "delta", low=0.0, high=1.0, closed=False)
    for name in ("index", "n"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an integer; got {value!r}.")
    if p.index < 0:
        raise ValueError(f"`index` must be >= 0 (row 0 is the full model); got {p.index}.")
    if p.n < 2:
        raise ValueError(f"`n` (calibration samples) must be >= 2; got {p.n}.")
    _number(p.loss_bound, "loss_bound", low=1e-12, high=1e12)
    _number(p.empirical_risk, "empirical_risk", low=-p.loss_bound, high=p.loss_bound)
    if not isinstance(p.certified, bool):
        raise TypeError(f"`certified` must be true or false; got {p.certified!r}.")
    _check_threshold_fields(p)
    for name in ("upper_bound", "p_value", "expected_cost", "full_cost"):
        value = getattr(p, name)
        if value is not None:
            _number(value, name, low=-1e300, high=1e300)
    if p.p_value is not None:
        _number(p.p_value, "p_value", low=0.0, high=1.0)
    for name in ("expected_cost", "full_cost"):
        value = getattr(p, name)
        if value is not None and value < 0:
            raise ValueError(f"`{name}` must be >= 0; got {value!r}.")
    multi = bool(p.risks) or p.pareto is not None
    if multi:
        _check_multi_fields(p, procedure)
    if p.certified:
        if not procedure.has_guarantee:
            raise ValueError(f"`certified` must be false for {procedure.name!r} (no guarantee).")
        if p.index == 0:
            raise ValueError("`certified` must be false at row 0 (the full model is the fallback).")
        tolerance = 1e-9
        for promise in p.risks[1:]:
            _check_certified_promise(promise, procedure, p.delta, tolerance)
        if procedure.reports_upper_bound and not (
            p.upper_bound is not None and p.upper_bound < p.target_risk + tolerance
        ):
            raise ValueError(
                f"a certified {procedure.name!r} policy needs an `upper_bound` below the target "
                f"risk {p.target_risk:g}; got {p.upper_bound!r}."
            )
        if procedure.test == "crc" and not (
            p.upper_bound is not None and p.upper_bound <= p.target_risk + tolerance
        ):
            raise ValueError(
                f"a certified {procedure.name!r} policy needs an adjusted risk (`upper_bound`) at "
                f"most the target risk {p.target_risk:g}; got {p.upper_bound!r}."
            )
        if procedure.name.startswith("ltt") and not (
            p.p_value is not None and p.p_value <= p.delta + tolerance
        ):
            raise ValueError(
                f"a certified {procedure.name!r} policy needs a `p_value` at most delta "
                f"{p.delta:g}; got {p.p_value!r}."
            )
    elif procedure.has_guarantee and p.index != 0:
        raise ValueError(
            f"an uncertified {procedure.name!r} policy must be the full model (row 0); got "
            f"index {p.index}."
        )
    if multi:
        expected = multi_guarantee_text(procedure, p.promises, p.delta, p.pareto)
        if p.guarantee != expected:
            raise ValueError(
                f"`guarantee` does not state the guarantee of {procedure.name!r} for these "
                f"risks at delta={p.delta:g}: expected {expected!r}."
            )
    elif p.guarantee != procedure.guarantee_text(p.target_risk, p.delta):
        raise ValueError(
            "`guarantee` does not state the guarantee of "
            f"{procedure.name!r} at target_risk={p.target_risk:g}, delta={p.delta:g}."
        )
    for name in ("risk", "confidence", "model_fingerprint"):
        _optional_text(getattr(p, name), name)
    if p.n_exits is not None and (
        isinstance(p.n_exits, bool) or not isinstance(p.n_exits, int) or p.n_exits < 1
    ):
        raise ValueError(f"`n_exits` must be a positive integer or null; got {p.n_exits!r}.")
    if not isinstance(p.data_fingerprint, str) or len(p.data_fingerprint) > 64:
        raise ValueError(f"`data_fingerprint` must be a short string; got {p.data_fingerprint!r}.")
    if p.sample_order not in (None, "random", "given"):
        raise ValueError(
            f'`sample_order` must be "random", "given" or null; got {p.sample_order!r}.'
        )
    if p.order_seed is not None and (
        isinstance(p.order_seed, bool) or not isinstance(p.order_seed, int) or p.order_seed < 0
    ):
        raise ValueError(
            f"`order_seed` must be a non-negative integer or null; got {p.order_seed!r}."
        )
    if (p.sample_order == "random") != (p.order_seed is not None):
        raise ValueError(
            '`order_seed` must be given exactly when `sample_order` is "random"; got '
            f"sample_order={p.sample_order!r}, order_seed={p.order_seed!r}."
        )
    if procedure.order_dependent and p.sample_order is None:
        raise ValueError(
            f"{procedure.name!r} depends on the order of the samples: `sample_order` must say "
            "how they were read."
        )


def _check_threshold_fields(p: ExitPolicy) -> None:
    """The scalar threshold, the vector and the function: types, ranges, row 0."""
    threshold = p.threshold
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(
                '`threshold` must be a number in [0, 1], "never" (the full model) or null '
                f"(the policy is its row `index`); got {threshold!r}."
            )
        if math.isinf(threshold) and threshold > 0:
            if p.index != 0:
                raise ValueError(
                    f'`threshold` "never" (the full model) belongs to row 0; got index {p.index}.'
                )
        elif not (0.0 <= threshold <= 1.0):
            raise ValueError(
                '`threshold` must be a number in [0, 1], "never" (the full model) or null; '
                f"got {threshold!r}."
            )
        elif p.index == 0:
            raise ValueError(
                f'row 0 is the full model, whose threshold is "never"; got {threshold!r}.'
            )
    if p.threshold_function is not None:
        if not isinstance(p.threshold_function, ThresholdFamily):
            raise TypeError(
                "`threshold_function` must be a ThresholdFamily; got "
                f"{type(p.threshold_function).__name__}."
            )
        if threshold is None:
            raise ValueError(
                'a `threshold_function` needs its scalar `threshold` (or "never"); got null.'
            )
    if p.thresholds is None:
        return
    if threshold is not None or p.threshold_function is not None:
        raise ValueError(
            "a policy holds one of a scalar `threshold` (with an optional "
            "`threshold_function`) or a vector `thresholds`; got both."
        )
    for value in p.thresholds:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"`thresholds` must hold floats in [0, 1] or inf (never exit there); got {value!r}."
            )
    count = p.n_exits if p.n_exits is not None else len(p.thresholds) + 1
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 2):
        raise ValueError(f"`n_exits` must be a positive integer or null; got {p.n_exits!r}.")
    check_threshold_vector(p.thresholds, count, name="thresholds")
    full = all(math.isinf(v) for v in p.thresholds)
    if full != (p.index == 0):
        raise ValueError(
            'row 0 is the full model, whose thresholds are all "never", and only row 0; got '
            f"index {p.index} with thresholds {p.thresholds!r}."
        )


def _check_multi_fields(p: ExitPolicy, procedure: Procedure) -> None:
    """A policy with several risks or certified by Pareto Testing."""
    from exitguard.risk.pareto import PARETO_PROCEDURES  # numpy only

    if procedure.name not in PARETO_PROCEDURES:
        raise ValueError(
            "a policy with several risks (or certified by Pareto Testing) needs a fixed-sequence "
            f"procedure ({', '.join(PARETO_PROCEDURES)}); got {procedure.name!r}."
        )
    for promise in p.risks:
        if not isinstance(promise, RiskPromise):
            raise TypeError(f"`risks` must hold RiskPromise objects; got {promise!r}.")
    if p.risks:
        first = p.risks[0]
        expected = (
            first.risk,
            first.target_risk,
            first.loss_bound,
            first.empirical_risk,
            first.p_value,
            first.upper_bound,
        )
        given = (
            p.risk,
            p.target_risk,
            p.loss_bound,
            p.empirical_risk,
            p.p_value,
            p.upper_bound,
        )
        if expected != given:
            raise ValueError(
                "the first of `risks` must repeat the policy's risk, target_risk, loss_bound, "
                f"empirical_risk, p_value and upper_bound: {expected!r} against {given!r}."
            )
        labels = [r.label for r in p.risks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"`risks` must not repeat a risk; got {labels}.")
    if p.pareto is not None and p.pareto not in PARETO_SOURCES:
        raise ValueError(f'`pareto` must be "split", "external" or null; got {p.pareto!r}.')
    if (p.pareto is None) != (p.n_opt is None):
        raise ValueError(
            "`n_opt` (optimisation samples) must be given exactly when `pareto` is; got "
            f"pareto={p.pareto!r}, n_opt={p.n_opt!r}."
        )
    if p.n_opt is not None:
        if isinstance(p.n_opt, bool) or not isinstance(p.n_opt, int) or p.n_opt < 1:
            raise ValueError(f"`n_opt` must be a positive integer; got {p.n_opt!r}.")
        if p.pareto == "split" and p.n_opt >= p.n:
            raise ValueError(
                f"`n_opt` ({p.n_opt}) must be below `n` ({p.n}): the split leaves the rest "
                "of the calibration samples to the test."
            )


def _check_certified_promise(
    promise: RiskPromise, procedure: Procedure, delta: float, tolerance: float
) -> None:
    if procedure.reports_upper_bound and not (
        promise.upper_bound is not None and promise.upper_bound < promise.target_risk + tolerance
    ):
        raise ValueError(
            f"a certified {procedure.name!r} policy needs every risk's `upper_bound` below its "
            f"target: {promise.label} has {promise.upper_bound!r} for {promise.target_risk:g}."
        )
    if not procedure.reports_upper_bound and not (
        promise.p_value is not None and promise.p_value <= delta + tolerance
    ):
        raise ValueError(
            f"a certified {procedure.name!r} policy needs every risk's `p_value` at most delta "
            f"{delta:g}: {promise.label} has {promise.p_value!r}."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class AppliedPolicy:
    """A policy applied to per-exit outputs (see :meth:`ExitPolicy.apply`).

    Attributes
    ----------
    exits : int array (n,)
        0-based exit taken by every sample.
    predictions : int array (n,)
        Predicted class at that exit.
    losses : float array (n,) or None
        Loss relative to the full model (the policy's risk), when it could be computed.
    cost : float array (n,)
        Cost of the exit taken (``exit_cost``; by default the number of exits evaluated).
    full_cost : float
        Cost of the last exit (the full model).
    n_exits : int
    risk : str or None
    target_risk : float
    """

    exits: NDArray[np.int64]
    predictions: NDArray[np.int64]
    losses: NDArray[np.float64] | None
    cost: NDArray[np.float64]
    full_cost: float
    n_exits: int
    risk: str | None
    target_risk: float

    @property
    def empirical_risk(self) -> float | None:
        """Mean loss over the samples, when the losses are known."""
        return None if self.losses is None else float(self.losses.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    @property
    def relative_saving(self) -> float | None:
        """1 - mean cost / full cost."""
        return 1.0 - self.mean_cost / self.full_cost if self.full_cost > 0 else None

    @property
    def exit_counts(self) -> NDArray[np.int64]:
        """Number of samples leaving at each exit; shape (L,)."""
        return np.bincount(self.exits, minlength=self.n_exits)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no per-sample arrays)."""
        return {
            "n": len(self.exits),
            "risk": self.risk,
            "target_risk": self.target_risk,
            "empirical_risk": self.empirical_risk,
            "mean_cost": self.mean_cost,
            "full_cost": self.full_cost,
            "relative_saving": self.relative_saving,
            "exit_counts": self.exit_counts.tolist(),
        }

    def __repr__(self) -> str:
        risk = "unknown" if self.empirical_risk is None else f"{self.empirical_risk:.4g}"
        return (
            f"AppliedPolicy(n={len(self.exits)}, empirical_risk={risk}, "
            f"mean_cost={self.mean_cost:.4g}, full_cost={self.full_cost:.4g})"
        )


def load_policy(path: str | os.PathLike[str], *, key: bytes | str | None = None) -> ExitPolicy:
    """Read a policy JSON file written by :meth:`ExitPolicy.save` (see :meth:`ExitPolicy.load`)."""
    return ExitPolicy.load(path, key=key)
