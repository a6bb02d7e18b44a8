"""What a worker hands a task's runner: the resolved checkpoint, the typed shard context, and a shard's stats."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import pyarrow as pa

from igpt_batch.config import JobConfig
from igpt_batch.errors import ImageError
from igpt_batch.inputs.images import Loaded
from igpt_batch.model.checkpoint import CheckpointInfo
from igpt_batch.run.storage import OutputFolder

if TYPE_CHECKING:
    from igpt_batch.model.transformer import IGPT

STAGES = ("read_s", "wait_s", "preprocess_s", "model_s", "write_s")  # a shard's stages, in Stats and commit records


@dataclass(frozen=True)
class Resolved:
    """What the driver resolves once for a job and hands to every worker as plain data."""

    info: CheckpointInfo
    layers: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)  # Parquet schema metadata of every output part
    lease: object = None  # the job's lease fence (run.lease.Fence): workers check it before each commit


@dataclass
class Stats:
    """One shard's seconds in each stage (read and decode in the read-ahead threads, summed; the wait for them;
    preprocess; model; write), its total, and the http retries of its reads."""

    read_s: float = 0.0
    wait_s: float = 0.0
    preprocess_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    http_retries: int = 0

    def add_seconds(self, seconds: dict[str, float]) -> None:
        """Add a {stage: seconds} dict (what model.extractor counts) to the stages it names."""
        for stage, s in seconds.items():
            if stage in STAGES:
                setattr(self, stage, getattr(self, stage) + s)

    def seconds(self, digits: int = 4) -> dict[str, float]:
        """{stage: seconds} with total_s: a commit record's `stats`."""
        return {k: round(getattr(self, k), digits) for k in (*STAGES, "total_s")}

    @classmethod
    def of(cls, record: dict) -> "Stats":
        """A commit record's stats: its `stats` seconds and its `http_retries`."""
        seconds = {k: v for k, v in record.get("stats", {}).items() if k in (*STAGES, "total_s")}
        return cls(**seconds, http_retries=int(record.get("http_retries", 0)))

    def __add__(self, other: "Stats") -> "Stats":
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})


Read = Callable[[pa.Table, Stats, int], Iterator[tuple[str, str, "Loaded | ImageError"]]]


@dataclass(frozen=True)
class ShardContext:
    """What a task's runner is built with, inside a worker once its model has loaded."""

    cfg: JobConfig
    resolved: Resolved
    model: "IGPT"
    model_lock: threading.Lock  # two shards in flight share one model: model calls go one at a time
    out: OutputFolder
    read: Read  # (rows, stats, window) -> (id, uri, Loaded or ImageError) in row order, decoded `window` rows ahead
