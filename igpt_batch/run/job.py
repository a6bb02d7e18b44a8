"""One job, built once by the driver and passed down: config, task, resolved checkpoint, inputs read once, and plan."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

from igpt_batch.config import JobConfig
from igpt_batch.inputs.manifest import Inputs
from igpt_batch.run.context import Resolved
from igpt_batch.run.tasks.base import Plan, Task
from igpt_batch.run.versions import versions


@dataclass(frozen=True)
class Job:
    """What a job is, decided once by the driver before any work.

    `plan` holds the shards and, when the task reads a manifest, the scan (fingerprint, rows per tar, the input kind
    the workers read). `inputs` holds the rows the scan read, for the driver's own use (the overlap guard, the plan
    files, the pictures): workers get `for_workers()`, without them.
    """

    cfg: JobConfig
    task: Task
    resolved: Resolved
    plan: Plan
    inputs: Inputs | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str | None:
        """The input kind the workers read (manifest.KINDS); None for a task that reads no manifest."""
        return self.plan.scan.kind if self.plan.scan else None

    @cached_property
    def keys(self) -> dict:
        """The compatibility keys: a rerun must match them to reuse committed shards."""
        return self.task.compat_keys(self.cfg, self.resolved, self.plan)

    def record(self) -> dict:
        """What _job.json records about this job (the config with its secrets redacted)."""
        info = self.resolved.info
        return {"task": self.task.name, "config": self.cfg.to_dict(redact=True), "compat": self.keys,
                "model": self.cfg.model.name, "weights_fingerprint": info.weights_fingerprint,
                "palette_hash": info.palette_hash, "layers": list(self.resolved.layers), "n_px": info.n_px,
                "shards": len(self.plan.shards), "shard_size": self.cfg.run.shard_size, "input_kind": self.kind,
                "versions": versions()}

    def for_workers(self) -> "Job":
        """This job without the driver's copy of the input rows (workers read their plan files)."""
        return dataclasses.replace(self, inputs=None)

    def close(self) -> None:
        """Release the input rows kept for the driver; safe to call twice."""
        if self.inputs is not None:
            self.inputs.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
