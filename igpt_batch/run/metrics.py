"""Job metrics for Prometheus through ray.util.metrics; a no-op in any process where Ray is not initialised."""
from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger("igpt_batch")
TAGS = ("task", "job")  # on every metric; job is the output path (credentials removed): one value per job
STAGES = ("read", "wait", "preprocess", "model", "write")  # the worker's <stage>_s timings
SHARD_SECONDS = [1, 5, 15, 60, 300, 1200, 3600]  # histogram bounds for one shard's seconds

_lock = threading.Lock()
_metrics: dict | None = None  # created once per process, on first use with Ray up
_broken = False


def _get() -> dict | None:
    """The metric objects, or None when Ray is not initialised here (the local executor, tests, tools)."""
    global _metrics
    ray = sys.modules.get("ray")  # never import Ray for this: a process without it records nothing
    if ray is None or not ray.is_initialized():
        return None
    with _lock:
        if _metrics is None:
            _metrics = _create()
    return _metrics


def _create() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    # exported by the node's metrics agent as ray_<name>, counters with a _total suffix
    return {
        "rows_done": Counter("igpt_rows_done", "Output rows committed, by output kind",
                             tag_keys=TAGS + ("kind",)),
        "rows_failed": Counter("igpt_rows_failed", "Input rows that could not be used, by the stage that failed",
                               tag_keys=TAGS + ("stage",)),
        "stage_seconds": Counter("igpt_stage_seconds", "Seconds spent in each stage of committed shards",
                                 tag_keys=TAGS + ("stage",)),
        "shard_seconds": Histogram("igpt_shard_seconds", "Seconds from a shard's start to its commit",
                                   boundaries=SHARD_SECONDS, tag_keys=TAGS),
        "shards": Counter("igpt_shards", "Shards committed, retried and given up", tag_keys=TAGS + ("outcome",)),
        "actors": Gauge("igpt_actors", "Workers alive (placed) and pending (waiting for resources)",
                        tag_keys=TAGS + ("state",)),
    }


def job_tags(task_name: str, output_path: str) -> dict[str, str]:
    """The task and job tags for a job writing to output_path."""
    from igpt_batch.redact import redact_uri

    return {"task": task_name, "job": redact_uri(output_path)}


def _safely(fn, *args) -> None:
    """Metrics never fail a job: the first recording error is logged, and this process records nothing after it."""
    global _broken
    if _broken:
        return
    try:
        m = _get()
        if m is not None:
            fn(m, *args)
    except Exception as e:
        _broken = True
        log.warning("metrics disabled in this process: %s: %s", type(e).__name__, e)


def shard_committed(task_name: str, output_path: str, record: dict, tables: dict) -> None:
    """A worker committed a shard (its commit record, its output tables): rows by kind, failed rows by stage, and
    its stage seconds."""
    def rec(m):
        tags = job_tags(task_name, output_path)
        for kind, n in record["rows"].items():
            if kind != "errors" and n:
                m["rows_done"].inc(n, tags={**tags, "kind": kind})
        for stage, n in errors_by_stage(tables).items():
            m["rows_failed"].inc(n, tags={**tags, "stage": stage})
        stats = record.get("stats", {})
        for stage in STAGES:
            if stats.get(f"{stage}_s"):
                m["stage_seconds"].inc(stats[f"{stage}_s"], tags={**tags, "stage": stage})
        if "total_s" in stats:
            m["shard_seconds"].observe(stats["total_s"], tags=tags)

    _safely(rec)


def errors_by_stage(tables: dict) -> dict[str, int]:
    """{stage: rows} of a shard's errors table (read, decode, ...)."""
    t = tables.get("errors")
    if t is None or not t.num_rows or "stage" not in t.column_names:
        return {}
    out: dict[str, int] = {}
    for stage in t.column("stage").to_pylist():
        out[stage] = out.get(stage, 0) + 1
    return out


def shard(tags: dict, outcome: str) -> None:
    """The pool settled a shard: outcome is committed, retried or given_up."""
    _safely(lambda m: m["shards"].inc(1, tags={**tags, "outcome": outcome}))


def actors(tags: dict, alive: int, pending: int) -> None:
    """How many of the pool's workers are placed and how many wait for resources."""
    def rec(m):
        m["actors"].set(alive, tags={**tags, "state": "alive"})
        m["actors"].set(pending, tags={**tags, "state": "pending"})

    _safely(rec)
