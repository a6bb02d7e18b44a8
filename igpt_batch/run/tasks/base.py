"""The task interface: each task owns its compatibility keys, plan, per-shard runner, output schemas and pictures.

The driver, the executors and the worker know nothing task-specific: they call a `Task`. Everything a worker
needs is resolved once by the driver into a `Resolved` (plain data) and handed down.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from igpt_batch.config import JobConfig
from igpt_batch.inputs.manifest import Columns, Shard, scan_manifest
from igpt_batch.model.checkpoint import CheckpointInfo

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])
NIGHTLY = ("rows", "manifest_fingerprint", "shard_size")  # compat keys that may differ between nights of one store


def error_table(rows: list[dict]) -> pa.Table:
    """The errors/ kind: one row per input that could not be used."""
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def error_row(id_: str, uri: str, err) -> dict:
    """One errors/ row; the uri keeps no user:pass@ or presigned signature (the reason is already redacted)."""
    from igpt_batch.redact import redact_uri

    return {"id": id_, "uri": redact_uri(uri), "stage": err.stage, "error": err.reason}


def picture_inputs(cfg: JobConfig, info: CheckpointInfo):
    """The palette and the manifest's first rows: what the extract preview and the completion sheet draw."""
    from igpt_batch.inputs.manifest import Columns, iter_manifest
    from igpt_batch.model.checkpoint import read_clusters

    return read_clusters(info.path), next(iter_manifest(cfg.input.manifest, cfg.storage_options, Columns.of(cfg.input)))


@dataclass(frozen=True)
class Resolved:
    """What the driver resolves once for a job and hands to every worker as plain data."""

    info: CheckpointInfo
    layers: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)  # Parquet schema metadata of every output part
    lease: object = None  # h-output: the job's lease fence (run.lease.Fence); workers check it before each commit


@dataclass(frozen=True)
class Plan:
    """The job's units of work: manifest rows or seeds, cut into shards."""

    rows: int
    shards: list[Shard]
    manifest_fingerprint: str | None = None


class Task:
    """Base of the job tasks. Subclasses set the class attributes and implement `keys`, `runner` and `pictures`."""

    name = ""
    unit = "rows"  # progress unit
    reads_manifest = True  # shards read input rows (written by the driver to the output's plan files)

    def resolve(self, cfg: JobConfig, info: CheckpointInfo) -> Resolved:
        meta = {"model": cfg.model.name, "weights_fingerprint": info.weights_fingerprint,
                "palette_hash": info.palette_hash, "dtype": cfg.model.dtype, "task": self.name}
        return Resolved(info=info, meta=meta)

    def check(self, cfg: JobConfig, info: CheckpointInfo) -> None:
        """Task-specific config checks that need the checkpoint; raise ConfigError."""

    def plan(self, cfg: JobConfig) -> Plan:
        # streams: memory stays ~8 bytes a row; shards never span two tar files
        scan = scan_manifest(cfg.input.manifest, cfg.storage_options, Columns.of(cfg.input))
        return Plan(scan.rows, scan.shards(cfg.run.shard_size), scan.fingerprint)

    def outputs_per_row(self, cfg: JobConfig) -> int:
        return 1

    def compat_keys(self, cfg: JobConfig, resolved: Resolved, plan: Plan) -> dict:
        """Everything that decides what a shard contains; a rerun must match these to reuse committed shards."""
        info = resolved.info
        keys = {"task": self.name, "weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash,
                "dtype": cfg.model.dtype, "shard_size": cfg.run.shard_size, "rows": plan.rows,
                "manifest_fingerprint": plan.manifest_fingerprint}
        if self.reads_manifest:  # these decide which rows decode and to what pixels
            i = cfg.input
            keys |= {"draft": i.draft, "max_pixels": i.max_pixels, "max_bytes": i.max_bytes}
        return keys | self.keys(cfg, resolved)

    def keys(self, cfg: JobConfig, resolved: Resolved) -> dict:
        raise NotImplementedError

    def runner(self, ctx, resolved: Resolved):
        """Built inside the worker (the model is loaded there): a callable (shard, rows, stats) -> {kind: Table}."""
        raise NotImplementedError

    def pictures(self, cfg: JobConfig, resolved: Resolved, out) -> None:
        """The task's pictures, drawn from the committed output after the job."""
