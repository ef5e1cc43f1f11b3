"""`EarlyExitNetwork`: a backbone cut into stages, with an exit head after each stage.

Exit ``l`` reads the output of stage ``l``; the last exit is the backbone's own output (its
head is part of the last stage, or is the last head). Three ways to run it:

- ``network(x)``: every exit's logits in one pass, (B, L, C), for training and collection;
- ``network.infer(x, policy)``: real early exit, any batch size: after each stage the samples
  whose exit fires are written out and removed from the batch, only the rest go on;
- ``network.simulate(x, policy)``: the offline reference, the exit rule applied to the
  outputs of a full pass. ``infer`` and ``simulate`` take the same exits.

The exit rule is the one of :mod:`exitguard.risk.exits`: a sample leaves at the first exit
whose confidence is >= the threshold, else at the last exit; a threshold of ``math.inf``
never exits early. A threshold vector (one threshold per exit but the last, from a policy's
``thresholds`` or ``threshold_function``) applies the rule exit by exit; a disabled exit
(``inf``) does not run its head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from exitguard.nn.confidence import CONFIDENCES, ConfidenceFn, is_pointwise, resolve_measure
from exitguard.policy import ExitPolicy
from exitguard.risk.exits import check_threshold, check_threshold_vector, first_exit

Policy = ExitPolicy | float | Sequence[float]
Thresholds = float | tuple[float, ...]
"""A scalar threshold, or one threshold per exit but the last."""


class NonFiniteOutputWarning(UserWarning):
    """Inference produced NaN or infinite logits (e.g. from non-finite weights)."""


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(B, " + ", ".join("*" if d is None else str(d) for d in shape) + ")"


@dataclasses.dataclass(frozen=True, repr=False)
class InferenceResult:
    """Per-sample outcome of :meth:`EarlyExitNetwork.infer` (or ``simulate``).

    Attributes
    ----------
    predictions : Tensor of shape (B,) or (B, *S), int64
        Argmax class at the exit taken (per position for dense outputs).
    probs : Tensor of shape (B, C) or (B, C, *S)
        Class probabilities (softmax of the logits) at the exit taken.
    logits : Tensor of shape (B, C) or (B, C, *S)
        The exit head's output at the exit taken.
    exits : Tensor of shape (B,), int64
        0-based exit taken by each sample.
    confidence : Tensor of shape (B,), float64
        The confidence at the exit taken. Under the never-exit policy the intermediate
        heads are not evaluated, and a measure that needs them (patience) gives NaN.
    threshold : float or tuple of float
        The threshold that was applied (``math.inf`` = never exit early), or the threshold
        vector (one per exit but the last).
    measure : str
        Name of the confidence measure.
    n_exits : int
        Number of exits of the network.
    """

    predictions: Tensor
    probs: Tensor
    logits: Tensor
    exits: Tensor
    confidence: Tensor
    threshold: Thresholds
    measure: str
    n_exits: int

    @property
    def exit_counts(self) -> list[int]:
        """Number of samples that left at each exit; length ``n_exits``."""
        return torch.bincount(self.exits.cpu(), minlength=self.n_exits).tolist()

    def __repr__(self) -> str:
        values = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        words = ["never" if math.isinf(t) else f"{t:.4g}" for t in values]
        threshold = words[0] if len(words) == 1 else "(" + ", ".join(words) + ")"
        return (
            f"InferenceResult(batch={self.exits.shape[0]}, n_exits={self.n_exits}, "
            f"exit_counts={self.exit_counts}, threshold={threshold}, measure={self.measure!r})"
        )


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite (True for an empty tensor).

    One min-max pass (NaN and infinities reach the minimum or maximum): on CPU about 20x
    faster than ``torch.isfinite(x).all()``, which writes a boolean tensor of ``x``'s size
    first; that mattered for dense outputs (11 x 64 x 64 logits a sample).
    """
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class EarlyExitNetwork(nn.Module):
    """A backbone cut into stages, with an exit head after each stage.

    Parameters
    ----------
    stages : sequence of nn.Module, length L
        Run in order; stage ``l`` maps the previous stage's output (the input for stage 0)
        to one tensor. The modules are used as given, not copied.
    heads : sequence of nn.Module, length L or L - 1
        Exit head ``l`` maps stage ``l``'s output to logits (B, C) or (B, C, *S); every exit
        must give the same shape. With L - 1 heads the last stage's output already is the
        backbone's logits (its head is part of the last stage).
    confidence : {"max_softmax", "margin", "entropy", "patience"} or callable
        The confidence measure the exit thresholds apply to (see
        :mod:`exitguard.nn.confidence`); can be changed later through ``.confidence``.
    input_shape : tuple of int or None, optional
        Per-sample input shape (without the batch axis) that ``forward``, ``infer`` and
        ``simulate`` check; ``None`` entries accept any size, ``None`` checks nothing.
    resize : nn.Module, optional
        Applied to an exit's logits to give the network's output, e.g. bilinear upsampling of
        dense logits to the input resolution. The exit decision is taken before it, on the
        head's own (low-resolution) output, so :meth:`infer` resizes only the samples that
        leave at each exit; every method computes the confidence the same way. The heads'
        own outputs must then share one shape too.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> stages = [nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 3))]
    >>> network = EarlyExitNetwork(stages, [nn.Linear(8, 3)], input_shape=(4,))
    >>> network(torch.randn(5, 4)).shape
    torch.Size([5, 2, 3])
    >>> network.infer(torch.randn(5, 4), 0.0).exits.tolist()
    [0, 0, 0, 0, 0]
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        confidence: str | ConfidenceFn = "max_softmax",
        input_shape: Sequence[int | None] | None = None,
        resize: nn.Module | None = None,
    ) -> None:
        super().__init__()
        stages, heads = list(stages), list(heads)
        if not stages:
            raise ValueError("`stages` must hold at least one module; got an empty sequence.")
        for name, modules in (("stages", stages), ("heads", heads)):
            for index, module in enumerate(modules):
                if not isinstance(module, nn.Module):
                    raise TypeError(
                        f"`{name}[{index}]` must be an nn.Module; got {type(module).__name__}."
                    )
        if len(heads) == len(stages) - 1:
            heads.append(nn.Identity())  # the last stage ends in the backbone's own head
        elif len(heads) != len(stages):
            raise ValueError(
                f"`heads` must have one module per stage ({len(stages)}), or one fewer when "
                f"the last stage ends in the backbone's head; got {len(heads)}."
            )
        if resize is not None and not isinstance(resize, nn.Module):
            raise TypeError(f"`resize` must be an nn.Module or None; got {type(resize).__name__}.")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.resize = resize
        self.confidence = confidence
        self.input_shape = input_shape

    # ----------------------------------------------------------------- configuration

    @property
    def n_exits(self) -> int:
        """Number of exits L (the last one is the full model)."""
        return len(self.stages)

    @property
    def confidence(self) -> str:
        """Name of the confidence measure; set it with a name or a callable."""
        return self._confidence_name

    @confidence.setter
    def confidence(self, measure: str | ConfidenceFn) -> None:
        self._confidence_name, self._confidence_fn = resolve_measure(measure)
        self._confidence_pointwise = is_pointwise(self._confidence_fn)
        self._confidence_builtin = any(self._confidence_fn is f for f in CONFIDENCES.values())

    @property
    def input_shape(self) -> tuple[int | None, ...] | None:
        """Per-sample input shape checked on every call, or None."""
        return self._input_shape

    @input_shape.setter
    def input_shape(self, shape: Sequence[int | None] | None) -> None:
        if shape is not None:
            shape = tuple(shape)
            if not all(d is None or (isinstance(d, int) and d > 0) for d in shape):
                raise ValueError(
                    "`input_shape` must be a sequence of positive integers or None (any size); "
                    f"got {shape!r}."
                )
        self._input_shape = shape

    @property
    def fingerprint(self) -> str:
        """A short hash of the architecture: module types, tensor names and shapes.

        Weights, dtype and device do not enter it; a policy records it so that it is only
        applied to the network it was calibrated for. Cached while the modules stay the same.
        """
        modules = tuple(map(id, self.modules()))
        cached = self.__dict__.get("_fingerprint_cache")
        if cached is not None and cached[0] == modules:
            return str(cached[1])
        digest = hashlib.sha256(f"n_exits={self.n_exits};".encode())
        for name, module in self.named_modules():
            digest.update(f"{name}:{type(module).__name__};".encode())
        for name, tensor in self.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)};".encode())
        self.__dict__["_fingerprint_cache"] = (modules, digest.hexdigest()[:16])
        return digest.hexdigest()[:16]

    def extra_repr(self) -> str:
        return f"n_exits={self.n_exits}, confidence={self.confidence!r}"

    # ----------------------------------------------------------------- checks

    def check_input(self, x: Any) -> None:
        """Raise a clear error when ``x`` is not a batch this network accepts."""
        if not isinstance(x, Tensor):
            raise TypeError(f"`x` must be a torch.Tensor; got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"`x` must be a batch (B, ...) with B >= 1 samples; got shape {tuple(x.shape)}."
            )
        shape = self._input_shape
        if shape is not None and (
            x.ndim != len(shape) + 1
            or any(d is not None and d != s for d, s in zip(shape, x.shape[1:], strict=True))
        ):
            raise ValueError(
                f"`x` must have shape {_shape_text(shape)} for this network; got "
                f"{tuple(x.shape)}. (Set `network.input_shape = None` to accept any shape.)"
            )

    def check_policy(self, policy: Any, *, allow_unbound: bool = False) -> Thresholds:
        """The threshold of ``policy``, after checking that the policy fits this network.

        Parameters
        ----------
        policy : ExitPolicy, float or sequence of float
            A policy bound to this network (its ``n_exits``, ``model_fingerprint`` and
            ``confidence`` are checked), a plain threshold in [0, 1] (``math.inf`` never
            exits early), or a threshold vector: one threshold per exit but the last.
        allow_unbound : bool, default False
            Accept a policy that records no network (no ``n_exits`` or
            ``model_fingerprint``), which cannot be checked; by default it is refused. Bind
            a policy calibrated on this network's outputs with :meth:`bind_policy`.

        Returns
        -------
        float or tuple of float
            The threshold of a scalar policy; the threshold vector (L - 1 floats) of a vector
            or function policy, or of a plain vector.
        """
        if isinstance(policy, ExitPolicy):
            if policy.n_exits is not None and policy.n_exits != self.n_exits:
                raise ValueError(
                    f"`policy` was calibrated for a network with {policy.n_exits} exits; this "
                    f"network has {self.n_exits}. Calibrate on this network's exit outputs."
                )
            if policy.model_fingerprint is not None and policy.model_fingerprint != (
                fingerprint := self.fingerprint
            ):
                raise ValueError(
                    "`policy` was calibrated for a network with architecture fingerprint "
                    f"{policy.model_fingerprint!r}; this network's is {fingerprint!r}."
                )
            if policy.confidence is not None and policy.confidence != self.confidence:
                raise ValueError(
                    f"`policy` thresholds the confidence measure {policy.confidence!r}; this "
                    f"network uses {self.confidence!r}. Set `network.confidence = "
                    f"{policy.confidence!r}` or recalibrate."
                )
            if policy.threshold is None and policy.thresholds is None and not policy.is_full_model:
                raise ValueError(
                    f"`policy` selects row {policy.index} of a calibration table without "
                    "thresholds, so it cannot be applied to a network; calibrate with "
                    "thresholds (e.g. exitguard.calibrate on the exit outputs)."
                )
            if not allow_unbound and (policy.n_exits is None or policy.model_fingerprint is None):
                raise ValueError(
                    "`policy` does not record the network it was calibrated for (no `n_exits` "
                    "or `model_fingerprint`), so it cannot be checked against this one. After "
                    "calibrating on this network's exit outputs, bind it: `policy = "
                    "network.bind_policy(policy)`; or pass `allow_unbound=True` to apply it "
                    "unchecked."
                )
            if policy.kind != "scalar":
                return tuple(float(t) for t in policy.exit_thresholds(self.n_exits))
            if policy.is_full_model or policy.threshold is None:
                return math.inf
            return float(policy.threshold)
        if isinstance(policy, (Sequence, Tensor)) and not isinstance(policy, str):
            vector = policy.detach().cpu().numpy() if isinstance(policy, Tensor) else policy
            values = check_threshold_vector(vector, self.n_exits, name="policy")
            return tuple(float(t) for t in values)
        if isinstance(policy, bool) or not isinstance(policy, (int, float)):
            raise TypeError(
                "`policy` must be an ExitPolicy or a float threshold in [0, 1] (math.inf: never "
                "exit early), or a sequence of one threshold per exit but the last; got "
                f"{type(policy).__name__}."
            )
        return check_threshold(policy, name="policy")

    def _limits(self, threshold: Thresholds) -> tuple[float, ...]:
        """The threshold of every exit but the last: a scalar repeated, a vector as it is."""
        if isinstance(threshold, tuple):
            return threshold
        return (threshold,) * (self.n_exits - 1)

    def bind_policy(self, policy: ExitPolicy) -> ExitPolicy:
        """A copy of ``policy`` that records this network (exits, fingerprint, measure)."""
        if not isinstance(policy, ExitPolicy):
            raise TypeError(f"`policy` must be an ExitPolicy; got {type(policy).__name__}.")
        self.check_policy(policy, allow_unbound=True)  # what it records must fit
        return policy.with_model(
            n_exits=self.n_exits, model_fingerprint=self.fingerprint, confidence=self.confidence
        )

    # ----------------------------------------------------------------- passes

    def _run_stage(self, index: int, h: Tensor) -> Tensor:
        out = self.stages[index](h)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"stage {index} must return one tensor; got {type(out).__name__}. Exits can "
                "only be attached where a single tensor is passed on."
            )
        return out

    def forward_intermediates(
        self, x: Tensor, *, indices: Sequence[int] | None = None, stop_early: bool = True
    ) -> list[Tensor]:
        """Stage outputs (the exit heads' inputs) at the given exits.

        Parameters
        ----------
        x : Tensor of shape (B, ...)
        indices : sequence of int, optional
            Exits whose features to return; negative values count from the end. All by default.
        stop_early : bool, default True
            Stop after the last requested stage instead of running the whole backbone.

        Returns
        -------
        list of Tensor
            One feature tensor per requested exit, in increasing exit order.
        """
        self.check_input(x)
        take = self._normalise_indices(indices)
        stop = max(take) + 1 if stop_early else self.n_exits
        features, h = [], x
        for index in range(stop):
            h = self._run_stage(index, h)
            if index in take:
                features.append(h)
        return features

    def _normalise_indices(self, indices: Sequence[int] | None) -> list[int]:
        n_exits = self.n_exits
        if indices is None:
            return list(range(n_exits))
        if isinstance(indices, (int, str)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise TypeError(f"`indices` must be a sequence of integers; got {indices!r}.")
        if not indices:
            raise ValueError("`indices` must name at least one exit; got an empty sequence.")
        for i in indices:
            if not -n_exits <= i < n_exits:
                raise ValueError(
                    f"`indices` must lie in [{-n_exits}, {n_exits - 1}] (the network has "
                    f"{n_exits} exits); got {i}."
                )
        return sorted({i % n_exits for i in indices})

    def forward(self, x: Tensor) -> Tensor:
        """Every exit's logits in one pass: (B, ...) -> (B, L, C) or (B, L, C, *S)."""
        return self.exit_logits(x)[1]

    def _resized(self, logits: Tensor) -> Tensor:
        return logits if self.resize is None else self.resize(logits)

    def exit_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every exit's logits in one pass, as the exit decision sees them and as output.

        Returns
        -------
        decision : Tensor of shape (B, L, C, ...)
            The heads' own logits, from which confidences are computed.
        outputs : Tensor of shape (B, L, C, ...)
            The network's outputs: ``resize`` applied to ``decision`` (the same tensor
            without ``resize``).
        """
        self.check_input(x)
        decision, h = [], x
        for index, head in enumerate(self.heads):
            h = self._run_stage(index, h)
            decision.append(head(h))  # (B, C, ...)
        shapes = {tuple(o.shape) for o in decision}
        if len(shapes) > 1:
            listed = ", ".join(str(tuple(o.shape)) for o in decision)
            raise ValueError(f"every exit must give logits of the same shape; got {listed}.")
        stacked = torch.stack(decision, dim=1)  # (B, L, C, ...)
        if self.resize is None:
            return stacked, stacked
        outputs = [self.resize(o) for o in decision]  # (B, C, *S_out) each
        return stacked, torch.stack(outputs, dim=1)  # (B, L, C, *S_out)

    def _confidence_of(self, probs: Tensor) -> Tensor:
        """(B, l, C, ...) probabilities -> (B, l) float64 confidences."""
        scores = self._confidence_fn(probs.double())  # (B, l)
        if self._confidence_builtin:
            return scores  # in [0, 1] by construction
        # A custom measure: check what it returned.
        if tuple(scores.shape) != tuple(probs.shape[:2]):
            raise ValueError(
                f"confidence measure {self.confidence!r} must return shape "
                f"{tuple(probs.shape[:2])}; got {tuple(scores.shape)}."
            )
        if not bool(((scores >= -1e-6) & (scores <= 1 + 1e-6)).all()):
            raise ValueError(
                f"confidence measure {self.confidence!r} must return values in [0, 1]."
            )
        return scores.double().clamp(0.0, 1.0)

    @torch.inference_mode()
    def infer(
        self,
        x: Tensor,
        policy: Policy,
        *,
        allow_unbound: bool = False,
        audit: float | None = None,
        rng: Any = None,
        sample_ids: Any = None,
    ) -> Any:
        """Early-exit inference that really skips the stages a sample does not need.

        After each stage, the samples whose exit fires are written to the output and removed
        from the batch; only the others run the next stage. Any batch size works, and no
        sample waits for another. Under the never-exit policy (``math.inf``) the
        intermediate heads are not evaluated at all, so the cost is the backbone's.

        Parameters
        ----------
        x : Tensor of shape (B, ...)
            A batch on the network's device.
        policy : ExitPolicy, float or sequence of float
            A calibrated policy bound to this network (see :meth:`bind_policy`; checked to
            fit), a threshold in [0, 1] (``math.inf`` never exits early), or one threshold
            per exit but the last. A policy with a threshold vector or function applies one
            threshold per exit; the head of a disabled exit (``inf``) does not run (unless a
            measure that needs every head, patience, is used).
        allow_unbound : bool, default False
            Accept a policy that records no network (see :meth:`check_policy`).
        audit : float in [0, 1], optional
            Audited inference: each sample is also run to the last exit with this
            probability (independent coin flips from ``rng``, required), giving the policy's
            loss against the full model for a :class:`exitguard.monitor.RiskMonitor` (see
            :func:`exitguard.nn.audit.audited_infer`). ``sample_ids`` (B,) name the samples
            so that labels arriving later can be matched to the audits.

        Returns
        -------
        InferenceResult, or AuditedResult with ``audit``
            Predictions, probabilities, logits, exit and confidence of every sample, in the
            order of ``x``. The exits equal those of :meth:`simulate`; confidences are
            computed in float64 from the head's probabilities, as in the numpy reference.
            An ``AuditedResult`` also carries the audit and passes these attributes through.

        Notes
        -----
        A sample's outputs can differ in the last bits when it runs in a batch of another
        size (convolution kernels change with the batch size, e.g. at batch 1); confidences
        then differ by about 1e-7, so a confidence that close to the threshold may exit
        differently than in :meth:`simulate` on the full batch.

        Raises
        ------
        TypeError, ValueError
            For an input of the wrong type or shape, or a policy that does not fit.
        """
        if audit is not None:
            from exitguard.nn.audit import audited_infer

            return audited_infer(
                self,
                x,
                policy,
                audit=audit,
                rng=rng,
                allow_unbound=allow_unbound,
                sample_ids=sample_ids,
            )
        threshold = self.check_policy(policy, allow_unbound=allow_unbound)
        self.check_input(x)
        limits = self._limits(threshold)  # (L-1,) one threshold per exit but the last
        never = all(math.isinf(t) for t in limits)
        last = self.n_exits - 1
        n_samples = x.shape[0]
        rows = torch.arange(n_samples, device=x.device)  # (A,) batch rows still running
        history: list[Tensor] = []  # (A, C, ...) per exit so far, for non-pointwise measures
        outputs: dict[str, Tensor] = {}  # allocated when the first samples leave
        h = x
        for index, head in enumerate(self.heads):
            h = self._run_stage(index, h)  # (A, ...)
            if index < last and (
                never or (math.isinf(limits[index]) and self._confidence_pointwise)
            ):
                continue  # nothing can fire here: skip the head
            logits = head(h)  # (A, C, ...)
            probs = logits.softmax(dim=1)  # (A, C, ...)
            if self._confidence_pointwise:
                conf = self._confidence_of(probs.unsqueeze(1))[:, 0]  # (A,)
            elif never:
                conf = torch.full(rows.shape, math.nan, dtype=torch.float64, device=x.device)
            else:
                history.append(probs)
                conf = self._confidence_of(torch.stack(history, dim=1))[:, -1]  # (A,)
            if index == last:
                fire = None  # everyone still running leaves at the last exit
            else:
                fire = conf >= limits[index]  # (A,) compared in float64, like the numpy rule
                n_fire = int(fire.sum())
                if n_fire == 0:
                    continue
                if n_fire == rows.shape[0]:
                    fire = None
            pick = slice(None) if fire is None else fire
            out_logits, out_probs = logits[pick], probs[pick]  # (F, C, ...) leaving now
            if self.resize is not None:  # resized only for the samples that leave
                out_logits = self.resize(out_logits)  # (F, C, *S_out)
                out_probs = out_logits.softmax(dim=1)  # (F, C, *S_out)
            if fire is None and not outputs:
                # The whole batch leaves together (always so at batch 1): no copies needed.
                exits = torch.full((n_samples,), index, dtype=torch.long, device=x.device)
                return self._result(out_logits, out_probs, exits, conf, threshold)
            if not outputs:
                outputs = {
                    "logits": out_logits.new_empty((n_samples, *out_logits.shape[1:])),
                    "probs": out_probs.new_empty((n_samples, *out_probs.shape[1:])),
                    "exits": torch.empty(n_samples, dtype=torch.long, device=x.device),
                    "confidence": conf.new_empty(n_samples),
                }
            done = rows if fire is None else rows[fire]  # (F,) batch rows leaving now
            outputs["logits"][done] = out_logits
            outputs["probs"][done] = out_probs
            outputs["exits"][done] = index
            outputs["confidence"][done] = conf[pick]
            if fire is None:
                break
            keep = ~fire  # compact: only the samples still running go on
            rows, h = rows[keep], h[keep]
            history = [p[keep] for p in history]
        return self._result(
            outputs["logits"], outputs["probs"], outputs["exits"], outputs["confidence"], threshold
        )

    def _result(
        self,
        logits: Tensor,
        probs: Tensor,
        exits: Tensor,
        confidence: Tensor,
        threshold: Thresholds,
    ) -> InferenceResult:
        if not all_finite(logits):
            warnings.warn(
                "the network gave NaN or infinite logits at the exits taken, so these "
                "predictions are meaningless; check its weights (load_weights refuses "
                "non-finite ones) and inputs.",
                NonFiniteOutputWarning,
                stacklevel=3,
            )
        return InferenceResult(
            predictions=probs.max(dim=1).indices,  # first maximum, faster than argmax on dim 1
            probs=probs,
            logits=logits,
            exits=exits,
            confidence=confidence,
            threshold=threshold,
            measure=self.confidence,
            n_exits=self.n_exits,
        )

    @torch.inference_mode()
    def exit_confidences(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every exit's logits and confidences from one full pass.

        Returns
        -------
        logits : Tensor of shape (B, L, C, ...)
        confidences : Tensor of shape (B, L), float64
        """
        decision, logits = self.exit_logits(x)  # (B, L, C, ...) twice
        return logits, self._confidence_of(decision.softmax(dim=2))

    @torch.inference_mode()
    def simulate(
        self, x: Tensor, policy: Policy, *, allow_unbound: bool = False
    ) -> InferenceResult:
        """The offline reference for :meth:`infer`: one full pass, then the exit rule.

        Every stage and head runs on every sample, so nothing is saved; the result is what
        :meth:`infer` returns, computed the way the risk core sees the exit outputs.
        """
        threshold = self.check_policy(policy, allow_unbound=allow_unbound)
        logits, conf = self.exit_confidences(x)  # (B, L, C, ...), (B, L)
        probs = logits.softmax(dim=2)  # (B, L, C, ...)
        limits = torch.tensor(self._limits(threshold), dtype=torch.float64, device=conf.device)
        exits = first_exit(conf[:, :-1], limits)  # (B,) the core's rule, in float64
        at = exits.view(-1, 1, *([1] * (logits.ndim - 2)))  # (B, 1, 1, ...)
        at = at.expand(-1, 1, *logits.shape[2:])  # (B, 1, C, ...)
        chosen_logits = logits.gather(1, at).squeeze(1)  # (B, C, ...)
        chosen_probs = probs.gather(1, at).squeeze(1)  # (B, C, ...)
        confidence = conf.gather(1, exits[:, None])[:, 0]  # (B,)
        if bool(torch.isinf(limits).all()) and not self._confidence_pointwise:
            confidence = torch.full_like(confidence, math.nan)  # as in infer
        return self._result(chosen_logits, chosen_probs, exits, confidence, threshold)
