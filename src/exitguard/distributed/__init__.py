"""Collection and threshold sweeps on a Ray cluster, merged exactly by sample id.

Only the expensive part runs distributed: the model over many inputs (per-exit outputs) or,
for generators, once per candidate threshold (a sweep). Every work item's result is written
as a shard (npz, see :mod:`.shards`) by the driver, and the shards are joined by sample id
(:mod:`.merge`): each (configuration, sample) exactly once, duplicates and holes refused.
Calibration then runs on one machine from the merged table.

The shard and merge modules need numpy only; :func:`collect`, :func:`diffusion_sweep` and
:func:`lm_sweep` need Ray (``pip install "exitguard[ray]"``) and PyTorch, and are imported
when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from exitguard.distributed.merge import MergeError, merge_samples, merge_table
from exitguard.distributed.options import RaySettings
from exitguard.distributed.shards import Shard, ShardFileError, ShardStore

_LAZY = {
    "IncompleteRunError": "exitguard.distributed.runner",
    "RunReport": "exitguard.distributed.runner",
    "WorkItem": "exitguard.distributed.runner",
    "run": "exitguard.distributed.runner",
    "ModelPayload": "exitguard.distributed.models",
    "collect": "exitguard.distributed.jobs",
    "CollectJob": "exitguard.distributed.jobs",
    "diffusion_sweep": "exitguard.distributed.jobs",
    "DiffusionSweepJob": "exitguard.distributed.jobs",
    "lm_sweep": "exitguard.distributed.language",
    "LMSweepJob": "exitguard.distributed.language",
}

__all__ = [
    "CollectJob",
    "DiffusionSweepJob",
    "IncompleteRunError",
    "LMSweepJob",
    "MergeError",
    "ModelPayload",
    "RaySettings",
    "RunReport",
    "Shard",
    "ShardFileError",
    "ShardStore",
    "WorkItem",
    "collect",
    "diffusion_sweep",
    "lm_sweep",
    "merge_samples",
    "merge_table",
    "run",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exitguard.distributed' has no attribute {name!r}")
