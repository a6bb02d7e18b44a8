"""Shard commit records: one versioned schema (`"v": 2`), written by workers and read back (old records too)."""
from __future__ import annotations

import os
import time
from collections import Counter

import pyarrow as pa

VERSION = 2


def errors_by_reason(errors: pa.Table) -> Counter:
    """Count error rows by stage and the reason's class (no paths or URLs, so the summary stays small)."""
    from igpt_batch.errors import reason_class

    return Counter(f"{stage}: {reason_class(err)}"
                   for stage, err in zip(errors.column("stage").to_pylist(), errors.column("error").to_pylist()))


def make_record(shard, files: list[dict], tables: dict[str, pa.Table], *, fingerprint: str | None,
                started_at: float) -> dict:
    """A shard's commit record (v2): its row range, files, rows per kind, errors by reason, start and end times.
    The writer adds `stats` (seconds per stage); OutputFolder.commit adds `lease` (the job's fencing token)."""
    errors = tables.get("errors")
    return {
        "v": VERSION, "shard": shard.name, "start": shard.start, "stop": shard.stop, "files": files,
        "rows": {kind: t.num_rows for kind, t in tables.items()},
        "errors_by_reason": dict(errors_by_reason(errors)) if errors is not None and errors.num_rows else {},
        "started_at": round(started_at, 3), "ended_at": round(time.time(), 3), "lease": None,
        "fingerprint": fingerprint, "worker_pid": os.getpid(),
    }


def read_record(raw) -> dict:
    """A commit record in the v2 shape, whatever version wrote it. Records without `v` (v1) lack times, errors by
    reason and the lease: those read as None (unknown, not zero). Raises ValueError for something that is not one."""
    if not isinstance(raw, dict):
        raise ValueError(f"a commit record is a JSON object, not {type(raw).__name__}")
    files = raw.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                              and isinstance(f.get("rows"), int) for f in files):
        raise ValueError("its `files` is not a list of {path, rows}")
    if raw.get("v", 1) not in (1, VERSION):
        raise ValueError(f"commit record version {raw.get('v')!r} is newer than this igpt-batch reads ({VERSION})")
    rows = raw.get("rows") if isinstance(raw.get("rows"), dict) else {}
    return {"errors_by_reason": None, "started_at": None, "ended_at": None, "lease": None, "stats": {},
            "fingerprint": None, "worker_pid": None} | raw | {"v": VERSION, "rows": rows, "files": files}
