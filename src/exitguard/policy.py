"""`ExitPolicy`: the calibrated outcome, serialisable as JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from exitguard.risk._validation import check_class_indices, check_exit_cost, check_unit_scores
from exitguard.risk.confidence import CONFIDENCES, as_probabilities
from exitguard.risk.confidence import confidences as confidence_scores
from exitguard.risk.exits import exit_index
from exitguard.risk.losses import RISKS, get_risk, per_exit_losses, per_exit_prediction_losses
from exitguard.risk.procedures import get_procedure

SCHEMA_VERSION = 1
_SCHEMA_NAME = "exitguard.ExitPolicy"


class PolicyFileError(ValueError):
    """A policy file that cannot be read as an exitguard policy."""


def fingerprint(*arrays: NDArray[Any]) -> str:
    """A short, stable hash of arrays (shape, dtype and bytes), e.g. of the calibration data."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(str(contiguous.shape).encode())
        digest.update(str(contiguous.dtype).encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()[:16]


def guarantee_text(procedure: str, target_risk: float, delta: float) -> str:
    """The guarantee of a procedure, in words, for the given epsilon and delta."""
    return get_procedure(procedure).guarantee_text(target_risk, delta)


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """A calibrated early-exit policy.

    A sample leaves at the first exit whose confidence is >= ``threshold``; ``threshold``
    is ``inf`` for the full model (never exit early).

    Attributes
    ----------
    threshold : float or None
        The exit threshold (``math.inf`` = never exit early; ``None`` when the calibration
        table carried no thresholds, in which case ``index`` identifies the policy).
    index : int
        Row of the calibration grid that was selected (0 = the full model).
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

    @property
    def is_full_model(self) -> bool:
        """True when the policy never exits early."""
        return self.index == 0 or (self.threshold is not None and math.isinf(self.threshold))

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
        if self.threshold is None:
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
        exits = exit_index(scores, float(self.threshold))  # (n,)
        rows = np.arange(len(exits))
        losses = None
        if per_exit is not None:
            losses = per_exit[rows, exits] - per_exit[:, -1]  # (n,)
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
        if self.is_full_model:
            threshold = "never (full model)"
        elif self.threshold is None:
            threshold = f"row {self.index}"
        else:
            threshold = f"{self.threshold:.4g}"
        parts = [
            f"threshold={threshold}",
            f"procedure={self.procedure!r}",
            f"target_risk={self.target_risk:g}",
            f"delta={self.delta:g}",
            f"n={self.n}",
            f"empirical_risk={self.empirical_risk:.4g}",
            f"certified={self.certified}",
        ]
        if self.expected_cost is not None:
            parts.append(f"expected_cost={self.expected_cost:.4g}")
        return f"ExitPolicy({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the full model's threshold is written as ``"never"``."""
        data = dataclasses.asdict(self)
        if self.threshold is not None and math.isinf(self.threshold):
            data["threshold"] = "never"
        return {"schema": _SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExitPolicy:
        """Rebuild a policy from :meth:`to_dict` output, checking schema and types."""
        if not isinstance(data, Mapping):
            raise PolicyFileError(f"a policy must be a JSON object; got {type(data).__name__}.")
        if data.get("schema") != _SCHEMA_NAME:
            raise PolicyFileError(
                f"not an exitguard policy: `schema` must be {_SCHEMA_NAME!r}; "
                f"got {data.get('schema')!r}."
            )
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PolicyFileError(
                f"`schema_version` must be {SCHEMA_VERSION}; got {version!r}. "
                "Recalibrate with this version of exitguard."
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields) - {"schema", "schema_version"})
        if unknown:
            raise PolicyFileError(f"unknown policy fields: {', '.join(unknown)}.")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and name not in data
        ]
        if required:
            raise PolicyFileError(f"missing policy fields: {', '.join(required)}.")
        values = {name: data[name] for name in fields if name in data}
        threshold = values["threshold"]
        if threshold == "never":
            values["threshold"] = math.inf
        elif threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not (0.0 <= threshold <= 1.0)
        ):
            raise PolicyFileError(
                '`threshold` must be a number in [0, 1], "never" (the full model) or null '
                f"(unknown: the policy is its row `index`); got {threshold!r}."
            )
        for name in ("target_risk", "delta"):
            value = values[name]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0 < value < 1)
            ):
                raise PolicyFileError(f"`{name}` must be a number in (0, 1); got {value!r}.")
        for name in ("index", "n"):
            if isinstance(values[name], bool) or not isinstance(values[name], int):
                raise PolicyFileError(f"`{name}` must be an integer; got {values[name]!r}.")
        if not isinstance(values["certified"], bool):
            raise PolicyFileError(
                f"`certified` must be true or false; got {values['certified']!r}."
            )
        n_exits = values.get("n_exits")
        if n_exits is not None and (
            isinstance(n_exits, bool) or not isinstance(n_exits, int) or n_exits < 1
        ):
            raise PolicyFileError(f"`n_exits` must be a positive integer or null; got {n_exits!r}.")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the policy as JSON (atomically: a failed write leaves any old file intact)."""
        target = Path(path)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(temporary, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExitPolicy:
        """Read a policy written by :meth:`save`."""
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PolicyFileError(f"{source} is not valid JSON: {error}.") from error
        return cls.from_dict(data)


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


def load_policy(path: str | os.PathLike[str]) -> ExitPolicy:
    """Read a policy JSON file written by :meth:`ExitPolicy.save`."""
    return ExitPolicy.load(path)
