"""run.shard_size: auto. A shard stays the unit of retry and commit; its size is chosen once per output, from the
workers' requested resources, and recorded in _job.json so that a resume uses it on whatever hardware it runs."""
from __future__ import annotations

import copy
from typing import Callable

from igpt_batch.config import JobConfig

PART_BYTES = 128 << 20  # a GPU worker's shard: output parts of about this many bytes (what DuckDB, Spark, Ray Data like)
CPU_SHARD = 1024  # a CPU worker's shard, in rows: small, so a CPU run commits (and a retry loses) little at a time
MAX_SHARD = 1 << 20  # rows, whatever the row size


def auto_size(row_bytes: int, gpu: bool) -> int:
    """Rows per shard: CPU_SHARD on CPU; on GPU, parts of about PART_BYTES, a multiple of 1024 rows."""
    if not gpu:
        return CPU_SHARD
    rows = PART_BYTES // max(1, row_bytes)
    return max(CPU_SHARD, min(MAX_SHARD, rows // 1024 * 1024))


def recorded(previous: dict | None, task_name: str) -> int | None:
    """The shard size an earlier run of this task recorded in the output's _job.json, if any."""
    if not previous or previous.get("task") != task_name:
        return None
    size = previous.get("shard_size", (previous.get("compat") or {}).get("shard_size"))
    return size if isinstance(size, int) and size >= 1 else None


def resolve(cfg: JobConfig, task_name: str, row_bytes: int, previous: dict | None, gpu: Callable[[], bool]) -> JobConfig:
    """cfg with run.shard_size an integer: as configured; else the size the output recorded (a resume, unless
    --overwrite); else auto_size for the workers' resources (gpu(): whether each worker asks for a GPU)."""
    if cfg.run.shard_size != "auto":
        return cfg
    size = None if cfg.output.overwrite else recorded(previous, task_name)
    if size is None:
        size = auto_size(row_bytes, gpu())
    cfg = copy.deepcopy(cfg)
    cfg.run.shard_size = size
    return cfg
