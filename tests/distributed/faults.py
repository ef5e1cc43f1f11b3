"""A worker that kills its own process on chosen work items (the Ray actors import this)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from exitguard.distributed.runner import Job, Worker


class KillingWorker(Worker):
    """Wraps a worker; ``os._exit(1)`` on item ``target``: on its first attempt only (a marker
    file records it), or on every attempt with ``always``."""

    def __init__(self, inner: Worker, *, target: str, marker: str, always: bool) -> None:
        self.inner, self.target, self.marker, self.always = inner, target, marker, always

    def setup(self, weights: Any) -> None:
        self.inner.setup(weights)

    def compute(self, item: Any, inputs: Any) -> Any:
        if item.id == self.target:
            marker = Path(self.marker)
            attempts = int(marker.read_text()) if marker.is_file() else 0
            marker.write_text(str(attempts + 1))
            if self.always or attempts == 0:
                os._exit(1)  # the worker process dies mid-task, as if killed
        return self.inner.compute(item, inputs)


class KillingJob(Job):
    """A job whose workers die on item ``target`` (see :class:`KillingWorker`)."""

    def __init__(self, job: Job, *, target: str, marker: str, always: bool = False) -> None:
        self.job, self.target, self.marker, self.always = job, target, marker, always

    def description(self) -> dict[str, Any]:
        return self.job.description()

    def items(self) -> Any:
        return self.job.items()

    def inputs(self, item: Any, store: Any) -> Any:
        return self.job.inputs(item, store)

    def worker(self) -> Worker:
        return KillingWorker(
            self.job.worker(), target=self.target, marker=self.marker, always=self.always
        )

    def weights(self) -> dict[str, bytes]:
        return self.job.weights()

    def merge(self, store: Any, *, seconds: float) -> Any:
        return self.job.merge(store, seconds=seconds)
