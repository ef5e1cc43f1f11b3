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
from numpy.typing import NDArray

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


def load_policy(path: str | os.PathLike[str]) -> ExitPolicy:
    """Read a policy JSON file written by :meth:`ExitPolicy.save`."""
    return ExitPolicy.load(path)
