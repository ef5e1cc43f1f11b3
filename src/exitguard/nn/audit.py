"""Audited inference: a random share of the samples also runs every exit to the last one.

The audited samples give, with no labels, the policy's loss against the full model (for the
consistency risks; gap risks take labels later, matched by sample index) and every exit's
output, so they feed a :class:`exitguard.monitor.RiskMonitor` and, after an alarm, form a
fresh calibration set (:func:`exitguard.monitor.recalibrate`).

The audit decision of each sample is an independent coin flip with probability ``audit``
drawn from ``rng`` before anything about the sample is computed, as the monitor's guarantees
require.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from exitguard.nn.network import EarlyExitNetwork, InferenceResult
from exitguard.policy import ExitPolicy
from exitguard.risk.losses import RISKS, get_risk, per_exit_losses


@dataclasses.dataclass(frozen=True, repr=False)
class AuditedResult:
    """The policy's outputs for a batch, and what the audit learned.

    Attributes
    ----------
    result : InferenceResult
        The early-exit outputs of every sample (what is served).
    audited : bool array (B,)
        Which samples were audited.
    exit_probs : float64 array (A, L, C)
        Every exit's probabilities for the audited samples, in batch order (a calibration set).
    audited_exits : int array (A,)
        The exit each audited sample took under the policy.
    losses : float64 array (A,) or None
        The policy's loss against the full model on the audited samples, for consistency
        risks (no labels needed); None for gap risks (see :meth:`losses_with_labels`).
    audit_flops : float
        Extra compute of the audit: the audited samples' full pass with every head.
    served_flops : float
        Compute of the early-exit pass of the whole batch.
    """

    result: InferenceResult
    audited: NDArray[np.bool_]
    exit_probs: NDArray[np.float64]
    audited_exits: NDArray[np.int64]
    losses: NDArray[np.float64] | None
    audit_flops: float
    served_flops: float
    risk: str | None
    sample_ids: NDArray[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        # The served outputs (predictions, exits, probs, ...) pass through, as from infer.
        if name.startswith("_") or name == "result":
            raise AttributeError(name)
        return getattr(self.result, name)

    @property
    def overhead(self) -> float:
        """Audit compute relative to the served compute."""
        return self.audit_flops / self.served_flops if self.served_flops > 0 else 0.0

    def losses_with_labels(
        self, labels: Any, *, rng: np.random.Generator | int | None = None
    ) -> NDArray[np.float64]:
        """The policy's loss on the audited samples once their labels are known.

        ``labels`` is either an array (A,) in the order of the audits, or a mapping from
        sample id (``sample_ids``, by default the position in the batch) to label, for
        labels that arrive later and out of order; every audited sample must have one.
        """
        if self.risk not in RISKS:
            raise ValueError(f"the policy's risk {self.risk!r} is not one exitguard can score.")
        if isinstance(labels, Mapping):
            ids = (
                self.sample_ids
                if self.sample_ids is not None
                else np.arange(len(self.audited_exits))
            )
            missing = [i for i in ids.tolist() if i not in labels]
            if missing:
                raise ValueError(
                    f"`labels` has no label for {len(missing)} audited sample(s), e.g. id "
                    f"{missing[0]!r}."
                )
            labels = np.array([labels[i] for i in ids.tolist()])
        per_exit = per_exit_losses(self.exit_probs, labels, get_risk(self.risk, rng=rng))
        rows = np.arange(len(self.audited_exits))
        return per_exit[rows, self.audited_exits] - per_exit[:, -1]

    def __repr__(self) -> str:
        return (
            f"AuditedResult(batch={len(self.audited)}, audited={int(self.audited.sum())}, "
            f"overhead={self.overhead:.3f})"
        )


def audited_infer(
    network: EarlyExitNetwork,
    x: Tensor,
    policy: ExitPolicy,
    *,
    audit: float,
    rng: np.random.Generator | int | None,
    exit_flops: NDArray[np.float64] | None = None,
    allow_unbound: bool = False,
    sample_ids: Any = None,
) -> AuditedResult:
    """Early-exit inference on ``x`` with a random share ``audit`` also run to the last exit.

    Parameters
    ----------
    network, x, policy
        As in :meth:`EarlyExitNetwork.infer`.
    audit : float in [0, 1]
        Probability that a sample is audited (independent coin flips from ``rng``).
    rng : numpy Generator or int
        Source of the coin flips (required: audits must be random and repeatable).
    exit_flops : array (L,), optional
        FLOPs of a sample leaving at each exit, heads on the way included (its last entry is
        the audit's full pass with every head); default: counted with
        :func:`exitguard.nn.count_flops` on the first sample.
    sample_ids : array (B,), optional
        Names of the samples (default: their positions in the batch); the audited ones are
        kept in ``AuditedResult.sample_ids`` to match labels that arrive later.
    """
    if isinstance(audit, bool) or not isinstance(audit, (int, float)) or not (0.0 <= audit <= 1.0):
        raise ValueError(f"`audit` must be a probability in [0, 1]; got {audit!r}.")
    if rng is None:
        raise ValueError("`rng` must be a numpy Generator or a seed: audits must be repeatable.")
    generator = np.random.default_rng(rng)
    batch = x.shape[0]
    audited = generator.random(batch) < audit  # (B,) decided before anything is computed
    result = network.infer(x, policy, allow_unbound=allow_unbound)  # (B,) what is served
    if exit_flops is None:
        from exitguard.nn.flops import count_flops

        table = count_flops(network, x[:1])
        per_exit = table.to_exit.astype(np.float64)
        all_heads = float(per_exit[-1])  # every stage and every head
    else:
        per_exit = np.asarray(exit_flops, dtype=np.float64)
        all_heads = float(per_exit[-1])
    exits_all = result.exits.cpu().numpy()
    served = float(per_exit[exits_all].sum())
    index = torch.from_numpy(np.flatnonzero(audited)).to(x.device)
    if index.numel():
        with torch.inference_mode():
            logits = network(x[index])  # (A, L, C): every exit, one full pass
        # Softmax in the network's dtype, as infer computes it, then float64 for the risks.
        probs = logits.softmax(dim=2).double().cpu().numpy()  # (A, L, C)
    else:
        n_classes = result.probs.shape[1]
        probs = np.zeros((0, network.n_exits, n_classes))
    exits = exits_all[audited]  # (A,)
    losses = None
    if policy.risk in RISKS and not get_risk(policy.risk).needs_labels and len(exits):
        per_exit_loss = per_exit_losses(probs, None, get_risk(policy.risk, rng=generator))
        rows = np.arange(len(exits))
        losses = per_exit_loss[rows, exits] - per_exit_loss[:, -1]  # (A,)
    elif policy.risk in RISKS and not get_risk(policy.risk).needs_labels:
        losses = np.zeros(0)
    ids = np.arange(batch) if sample_ids is None else np.asarray(sample_ids)
    if ids.shape != (batch,):
        raise ValueError(f"`sample_ids` must have shape ({batch},); got {ids.shape}.")
    return AuditedResult(
        result=result,
        audited=audited,
        exit_probs=probs,
        audited_exits=exits,
        losses=losses,
        audit_flops=all_heads * int(audited.sum()),
        served_flops=served,
        risk=policy.risk,
        sample_ids=ids[audited],
    )
