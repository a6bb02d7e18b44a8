"""The task interface: each task owns its compatibility keys, plan, per-shard runner, output schemas and pictures.

The driver, the executors and the worker know nothing task-specific: they call a `Task`. Everything a worker
needs is resolved once by the driver into a `Resolved` (plain data) and handed down in the job; inside the worker a
task's runner is built from a `ShardContext` and called once per shard with the shard's plan rows and its `Stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from igpt_batch.config import JobConfig
from igpt_batch.inputs.manifest import ManifestScan, Shard
from igpt_batch.model.checkpoint import CheckpointInfo
from igpt_batch.run.context import Resolved, ShardContext, Stats
from igpt_batch.run.storage import OutputFolder

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])
NIGHTLY = ("rows", "manifest_fingerprint", "shard_size")  # compat keys that may differ between nights of one store


def shard_size(cfg: JobConfig) -> int:
    """run.shard_size as the driver resolved it (driver.prepare); an unresolved "auto" (a job built by hand, as in
    tests) is the CPU size."""
    from igpt_batch.run.sizing import CPU_SHARD

    return CPU_SHARD if cfg.run.shard_size == "auto" else cfg.run.shard_size


def error_table(rows: list[dict]) -> pa.Table:
    """The errors/ kind: one row per input that could not be used."""
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def error_row(id_: str, uri: str, err) -> dict:
    """One errors/ row; the uri keeps no user:pass@ or presigned signature (the reason is already redacted)."""
    from igpt_batch.redact import redact_uri

    return {"id": id_, "uri": redact_uri(uri), "stage": err.stage, "error": err.reason}


Runner = Callable[[Shard, "pa.Table | None", Stats], dict[str, pa.Table]]  # (shard, plan rows, stats) -> {kind: Table}


@dataclass(frozen=True)
class Plan:
    """The job's units of work: manifest rows or seeds, cut into shards; with the scan of the inputs they come from
    (its fingerprint, rows per tar, and the input kind the workers read) when the task reads a manifest."""

    rows: int
    shards: list[Shard]
    scan: ManifestScan | None = None

    @property
    def manifest_fingerprint(self) -> str | None:
        return self.scan.fingerprint if self.scan else None


class Task:
    """Base of the job tasks. Subclasses set the class attributes and implement `keys`, `runner` and `pictures`."""

    name = ""
    unit = "rows"  # progress unit
    reads_manifest = True  # shards read input rows (written by the driver to the output's plan files)
    formats = ("parquet",)  # the output.format values it writes

    def resolve(self, cfg: JobConfig, info: CheckpointInfo) -> Resolved:
        meta = {"model": cfg.model.name, "weights_fingerprint": info.weights_fingerprint,
                "palette_hash": info.palette_hash, "dtype": cfg.model.dtype, "task": self.name}
        return Resolved(info=info, meta=meta)

    def check(self, cfg: JobConfig, info: CheckpointInfo) -> None:
        """Task-specific config checks that need the checkpoint; raise ConfigError."""

    def plan(self, cfg: JobConfig, scan: ManifestScan | None) -> Plan:
        """The shards of the scanned manifest (None for a task that reads none); shards never span two tar files."""
        return Plan(scan.rows, scan.shards(shard_size(cfg)), scan)

    def outputs_per_row(self, cfg: JobConfig) -> int:
        return 1

    def part_row_bytes(self, cfg: JobConfig, info: CheckpointInfo) -> int:
        """About how many output bytes one shard row makes (run.shard_size: auto sizes parts from it)."""
        return 256

    def compat_keys(self, cfg: JobConfig, resolved: Resolved, plan: Plan) -> dict:
        """Everything that decides what a shard contains; a rerun must match these to reuse committed shards."""
        info = resolved.info
        keys = {"task": self.name, "weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash,
                "dtype": cfg.model.dtype, "shard_size": shard_size(cfg), "rows": plan.rows,
                "manifest_fingerprint": plan.manifest_fingerprint}
        if self.reads_manifest:  # these decide which rows decode and to what pixels
            i = cfg.input
            keys |= {"draft": i.draft, "max_pixels": i.max_pixels, "max_bytes": i.max_bytes}
        return keys | self.keys(cfg, resolved)

    def keys(self, cfg: JobConfig, resolved: Resolved) -> dict:
        raise NotImplementedError

    def runner(self, ctx: ShardContext) -> Runner:
        """Built inside the worker once the model has loaded: a callable (shard, rows, stats) -> {kind: Table}."""
        raise NotImplementedError

    def pictures(self, cfg: JobConfig, resolved: Resolved, out: OutputFolder, head: pa.Table | None,
                 commits: dict[str, dict]) -> None:
        """The task's pictures, drawn from the committed output after the job, reading only the rows they show;
        `head` holds the first input rows' id and uri (None for a task that reads no manifest); `commits` the commit
        records in hand, by shard name."""
