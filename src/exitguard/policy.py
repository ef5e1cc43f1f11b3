"""`ExitPolicy`: the calibrated outcome, serialisable as JSON."""

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
from exitguard.risk.exits import exit_index
from exitguard.risk.losses import RISKS, get_risk, per_exit_losses, per_exit_prediction_losses
from exitguard.risk.procedures import get_procedure

SCHEMA_VERSION = 2
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
        digest.update(memoryview(contiguous).cast("B"))  # no copy of the data
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

    def __post_init__(self) -> None:
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
        return dataclasses.replace(
            self,
            threshold=math.inf,
            index=0,
            certified=False,
            empirical_risk=0.0,
            upper_bound=None,
            p_value=None,
            expected_cost=self.full_cost,
        )

    def _payload(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.threshold is not None and math.isinf(self.threshold):
            data["threshold"] = "never"
        return {"schema": _SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **data}

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
        if version != SCHEMA_VERSION:
            raise PolicyFileError(
                f"`schema_version` must be {SCHEMA_VERSION}; got {version!r}. "
                "Recalibrate with this version of exitguard."
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        envelope = {"schema", "schema_version", "digest", "signature"}
        unknown = sorted(set(data) - set(fields) - envelope)
        if unknown:
            raise PolicyFileError(f"unknown policy fields: {', '.join(unknown)}.")
        missing = sorted(set(fields) - set(data))
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
        values = {name: data[name] for name in fields}
        if values["threshold"] == "never":
            values["threshold"] = math.inf
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise PolicyFileError(str(error)) from error

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
    if p.certified:
        if not procedure.has_guarantee:
            raise ValueError(f"`certified` must be false for {procedure.name!r} (no guarantee).")
        if p.index == 0:
            raise ValueError("`certified` must be false at row 0 (the full model is the fallback).")
        tolerance = 1e-9
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
    if p.guarantee != procedure.guarantee_text(p.target_risk, p.delta):
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
