"""What a language-model policy is bound to: the model, the exit heads and the decoding.

A threshold calibrated on an ``exitguard lm sweep`` table holds only for the decoding that
produced the table: the same model, the same exit heads (same exits, same weights), the same
confidence measure, threshold decay and cache mode. A policy records them in its
``model_fingerprint`` field as one line (and its ``n_exits`` and ``confidence`` fields):

    lm1;model=<16 hex>;heads=<16 hex>;exits=2.5.8.29;decay=0.0;kv=propagate

``exits`` lists the 0-based decoder layers of every exit, the final one included (a hash
``#<hex>`` when the list is long). This module needs numpy only, so the core command line can
copy a table's binding into a policy without importing torch.

The table written by :meth:`~exitguard.tasks.language.SweepTable.save` carries the binding
as ``model_fingerprint`` (str), ``n_exits`` (int) and ``confidence_name`` (str);
:func:`policy_fields_from_table` reads and checks them for ``ExitPolicy.with_model``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PREFIX = "lm1"
KV_FILLS: tuple[str, ...] = ("propagate", "recompute", "defer")
"""How skipped layers' caches are filled (see :mod:`~exitguard.tasks.language.decode`)."""
CONFIDENCES: tuple[str, ...] = ("learned", "state", "softmax", "margin")
"""The language model's confidence measures (see :mod:`~exitguard.tasks.language.decode`)."""
_HEX = re.compile(r"[0-9a-f]{16}|none")
_EXITS = re.compile(r"\d{1,6}(\.\d{1,6})*|#[0-9a-f]{16}")
_MAX_LISTED = 80


@dataclasses.dataclass(frozen=True)
class LMBinding:
    """The model, heads and decoding a language-model policy belongs to.

    Build one with :meth:`create`; :meth:`fingerprint` and :meth:`parse` convert it to and
    from the policy's ``model_fingerprint``.

    Attributes
    ----------
    model : str
        :func:`~exitguard.tasks.language.model.model_fingerprint` of the model.
    heads : str
        :func:`~exitguard.tasks.language.heads.heads_fingerprint` of the exit heads
        (``"none"`` without heads).
    exits : str
        The 0-based decoder layer of every exit, the final one included, joined by ``.``
        (``#<hex>``, a hash of that text, when it is long).
    decay : float
        CALM threshold decay rate (0: constant threshold).
    kv_fill : {"propagate", "recompute", "defer"}
        How skipped layers' caches are filled.
    """

    model: str
    heads: str
    exits: str
    decay: float
    kv_fill: str

    def __post_init__(self) -> None:
        for name in ("model", "heads"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX.fullmatch(value):
                raise ValueError(f"`{name}` must be a 16-digit hex fingerprint; got {value!r}.")
        if not isinstance(self.exits, str) or not _EXITS.fullmatch(self.exits):
            raise ValueError(f"`exits` must list layer numbers joined by '.'; got {self.exits!r}.")
        decay = float(self.decay)
        if not math.isfinite(decay) or decay < 0:
            raise ValueError(f"`decay` must be a finite float >= 0; got {self.decay!r}.")
        object.__setattr__(self, "decay", decay)
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"`kv_fill` must be one of {KV_FILLS}; got {self.kv_fill!r}.")

    @classmethod
    def create(
        cls, *, model: str, heads: str, exit_layers: Sequence[int], decay: float, kv_fill: str
    ) -> LMBinding:
        """A binding from the exits' 0-based layers (the final exit included)."""
        layers = [int(layer) for layer in exit_layers]
        if not layers or any(b <= a for a, b in itertools.pairwise(layers)):
            raise ValueError(f"`exit_layers` must be strictly increasing; got {layers!r}.")
        listed = ".".join(map(str, layers))
        if len(listed) > _MAX_LISTED:
            listed = "#" + hashlib.sha256(listed.encode()).hexdigest()[:16]
        return cls(model=model, heads=heads, exits=listed, decay=decay, kv_fill=kv_fill)

    @property
    def exit_layers(self) -> tuple[int, ...] | None:
        """The exits' 0-based layers; None when only their hash is recorded."""
        if self.exits.startswith("#"):
            return None
        return tuple(int(layer) for layer in self.exits.split("."))

    def fingerprint(self) -> str:
        """The one-line form stored in a policy's ``model_fingerprint``."""
        return (
            f"{PREFIX};model={self.model};heads={self.heads};exits={self.exits};"
            f"decay={self.decay!r};kv={self.kv_fill}"
        )

    @classmethod
    def parse(cls, text: str | None) -> LMBinding | None:
        """The binding in a ``model_fingerprint``; None when it is not a language model's.

        Raises ValueError for a language-model fingerprint that is malformed.
        """
        if not isinstance(text, str) or not text.startswith(PREFIX + ";"):
            return None
        fields = dict(part.partition("=")[::2] for part in text.split(";")[1:])
        if set(fields) != {"model", "heads", "exits", "decay", "kv"}:
            raise ValueError(f"malformed language-model binding {text!r}.")
        try:
            return cls(
                model=fields["model"],
                heads=fields["heads"],
                exits=fields["exits"],
                decay=float(fields["decay"]),
                kv_fill=fields["kv"],
            )
        except ValueError as error:
            raise ValueError(f"malformed language-model binding {text!r}: {error}") from error

    def differences(self, other: LMBinding) -> list[str]:
        """What differs between the policy's binding (``self``) and ``other``, in words."""
        found = []
        if self.model != other.model:
            found.append(f"the model (the policy's is {self.model}; this one is {other.model})")
        if self.heads != other.heads:
            found.append(f"the exit heads (the policy's are {self.heads}; these are {other.heads})")
        if self.exits != other.exits:
            found.append(
                f"the exit layers (the policy's are {self.describe_exits()}; these are "
                f"{other.describe_exits()})"
            )
        if self.decay != other.decay:
            found.append(
                f"the threshold decay (the policy's is {self.decay:g}; this decoding uses "
                f"{other.decay:g})"
            )
        if self.kv_fill != other.kv_fill:
            found.append(
                f"the cache mode kv_fill (the policy's is {self.kv_fill!r}; this decoding uses "
                f"{other.kv_fill!r})"
            )
        return found

    def describe_exits(self) -> str:
        """The exits as 1-based layer numbers (or their hash)."""
        layers = self.exit_layers
        if layers is None:
            return f"hashed {self.exits}"
        return "after layers " + ", ".join(str(layer + 1) for layer in layers)


def policy_fields_from_table(data: Mapping[str, Any]) -> dict[str, Any]:
    """The model fields a policy calibrated on this table must record, for ``with_model``.

    ``data`` is a loaded table (e.g. ``dict(np.load(path))``). A table written by
    ``exitguard lm sweep`` holds ``model_fingerprint``, ``n_exits`` and ``confidence_name``;
    the result is ``{"n_exits": int, "model_fingerprint": str, "confidence": str}``, to be
    passed as ``policy.with_model(**fields)``. A table without them gives ``{}``.

    Raises
    ------
    ValueError
        When only some of the keys are present, or one has the wrong type or value.
    """
    keys = ("model_fingerprint", "n_exits", "confidence_name")
    present = [key for key in keys if key in data]
    if not present:
        return {}
    if len(present) != len(keys):
        missing = sorted(set(keys) - set(present))
        raise ValueError(
            f"FILE: a table with model fields must hold all of {list(keys)}; missing {missing}."
        )
    values = {key: np.asarray(data[key]) for key in keys}
    for key in ("model_fingerprint", "confidence_name"):
        if values[key].shape != () or values[key].dtype.kind != "U" or len(str(values[key])) > 200:
            raise ValueError(f"FILE: `{key}` must be one string of at most 200 characters.")
    n_exits = values["n_exits"]
    if n_exits.shape != () or n_exits.dtype.kind not in "iu" or int(n_exits) < 1:
        raise ValueError(f"FILE: `n_exits` must be one positive integer; got {n_exits!r}.")
    fingerprint = str(values["model_fingerprint"])
    binding = LMBinding.parse(fingerprint)
    confidence = str(values["confidence_name"])
    if binding is not None:
        if confidence not in CONFIDENCES:
            raise ValueError(
                f"FILE: `confidence_name` must be one of {CONFIDENCES}; got {confidence!r}."
            )
        layers = binding.exit_layers
        if layers is not None and len(layers) != int(n_exits):
            raise ValueError(
                f"FILE: `n_exits` ({int(n_exits)}) does not match the exits recorded in "
                f"`model_fingerprint` ({len(layers)})."
            )
    return {"n_exits": int(n_exits), "model_fingerprint": fingerprint, "confidence": confidence}
