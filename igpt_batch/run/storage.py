"""The fsspec output folder: the one owner of an output's layout (parts, commit markers, plan, job and status files)."""
from __future__ import annotations

import bisect
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from igpt_batch.errors import LeaseError
from igpt_batch.run import planfile

log = logging.getLogger(__name__)
KINDS = ("embeddings", "samples", "errors")
JOB, SUCCESS, FAILED, PLAN, COMMITS, PNGS = "_job.json", "_SUCCESS", "_FAILED", "_plan", "_commits", "pngs"
LEASE = "_LEASE.json"
PICTURES = ("contact_sheet.png", "preview.png")
REPORT = "report.html"  # run/report.py
OURS = (JOB, SUCCESS, FAILED, PLAN, COMMITS, PNGS, *KINDS, *PICTURES, REPORT)  # all that --overwrite may remove (not the lease)
ROW_GROUP_BYTES = 128 << 20  # parts' row groups, uncompressed: large enough for DuckDB, Spark and Ray Data
MAX_ROW_GROUP_ROWS = 1 << 20
_PLAN_LOCK = threading.Lock()
_TMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # write_bytes' temp files


# Object stores flap: transient errors are retried by the client itself, configured here once (botocore's
# standard mode: exponential backoff with jitter, connection errors and throttling included; access denied never).
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def with_client_retries(url: str, storage_options: dict | None) -> dict:
    """storage_options plus the client's retry configuration for s3:// (a user's own setting wins)."""
    so = dict(storage_options or {})
    if url.split("://", 1)[0].lower() in ("s3", "s3a") and "://" in url:
        so["config_kwargs"] = {"retries": S3_RETRIES, **(so.get("config_kwargs") or {})}
    return so


class Folder:
    """A folder on any fsspec filesystem, written whole-file: local disk and s3:// share this code path."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **with_client_retries(url, storage_options))
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it."""
        final = self.path(rel)
        if not self.is_local:
            self.fs.pipe_file(final, data)  # an S3 PUT is atomic
            return
        # a hidden temp file beside the target, then an atomic rename; readers skip dot-files
        tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        except BaseException:  # disk full, interrupted: never leave the temp file behind
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def read_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def write_table(self, rel: str, table: pa.Table) -> dict:
        """One whole Parquet file (zstd) in row groups of about ROW_GROUP_BYTES; returns {path, rows}."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows(table))
        self.write_bytes(rel, sink.getvalue().to_pybytes())
        return {"path": rel, "rows": table.num_rows}

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)


class OutputFolder(Folder):
    """One job output. A shard's data files come first and only then _commits/part-SSSSS.json; readers trust only
    parts named in commit markers (read_output). Only this class spells the output's file names."""

    # -- the job and its status ----------------------------------------------
    def read_job(self) -> dict | None:
        return self.read_json(JOB)

    def start_job(self, job: dict) -> None:
        """Record this run's job (the rerun check reads it) and drop a previous run's status."""
        for status in (SUCCESS, FAILED):
            self.remove(status)
        self.write_json(JOB, job)

    def finish(self, summary: dict, ok: bool) -> None:
        """_SUCCESS (and the plan files removed: a rerun skips their shards) or _FAILED, written last."""
        if ok:
            self.remove(PLAN)
        self.write_json(SUCCESS if ok else FAILED, summary)

    def status(self) -> tuple[str, dict | None]:
        """('succeeded', summary) after _SUCCESS, ('failed', summary) after _FAILED, else ('running or stopped', None)."""
        for name, word in ((SUCCESS, "succeeded"), (FAILED, "failed")):
            summary = self.read_json(name)
            if summary is not None:
                return word, summary
        return "running or stopped", None

    def clear(self) -> None:
        """Remove what igpt-batch wrote here (--overwrite), and nothing else: other files in the folder stay."""
        for name in OURS:
            self.remove(name)

    def sweep_temp(self) -> int:
        """Remove temp files a killed writer left in this output's folders; returns how many."""
        if not self.is_local or not self.fs.exists(self.root):
            return 0
        found = [p for d in ("", PLAN, COMMITS, PNGS, *KINDS) if self.fs.isdir(self.path(d))
                 for p in self.fs.ls(self.path(d), detail=False) if _TMP.match(posixpath.basename(p))]
        for p in found:
            self.fs.rm(p)
        return len(found)

    # -- shards --------------------------------------------------------------
    def plan_writer(self) -> "planfile.PlanWriter":
        """The plan of the shards to run: a few Parquet files under _plan/ (an earlier run's removed first), each
        shard's rows in their own row groups. Use as a context manager; `add(shard, rows)` in shard order."""
        self.remove(PLAN)
        return planfile.PlanWriter(lambda first, data: self.write_bytes(f"{PLAN}/plan-{first:012d}.parquet", data))

    def read_plan(self, shard) -> pa.Table:
        """A shard's plan rows: its row groups of the plan file that holds it, in one ranged read. The listing of
        _plan/ and each file's footer are read once per OutputFolder (a worker's)."""
        with _PLAN_LOCK:  # a worker's two shards in flight share one listing and footer
            found = self._plan_footer(shard)
        return planfile.read_shard(self.fs, *found, shard.name)

    def _plan_footer(self, shard) -> tuple:
        if getattr(self, "_plan_files", None) is None or not self._plan_file(shard.shard_id):
            self.fs.invalidate_cache(self.path(PLAN))  # a listing cached by an earlier job in this process
            listed = self.fs.ls(self.path(PLAN), detail=True)
            self._plan_files = sorted((int(m.group(1)), f["name"], f["size"]) for f in listed
                                      if (m := re.fullmatch(r"plan-(\d+)\.parquet", posixpath.basename(f["name"]))))
            self._plan_footers = {}
        found = self._plan_file(shard.shard_id)
        if not found:
            raise FileNotFoundError(f"no plan file under {self.path(PLAN)} holds {shard.name}")
        _, path, size = found
        if path not in self._plan_footers:  # one file's footer at a time
            self._plan_footers = {path: planfile.read_footer(self.fs, path, size)}
        return (path, size, *self._plan_footers[path])

    def _plan_file(self, shard_id: int) -> tuple | None:
        """The listed plan file whose first shard id is the largest <= shard_id."""
        i = bisect.bisect_right(self._plan_files, (shard_id, "\uffff"))
        return self._plan_files[i - 1] if i else None

    def write_part(self, kind: str, shard_name: str, table: pa.Table) -> dict:
        """Write one shard's Parquet file for `kind` (row groups of about ROW_GROUP_BYTES); a retried shard replaces
        the same name."""
        return self.write_table(f"{kind}/{shard_name}.parquet", table)

    def write_png(self, seed: int, png: bytes) -> None:
        self.write_bytes(f"{PNGS}/seed-{seed:012d}.png", png)

    def has_pngs(self) -> bool:
        return self.exists(PNGS)

    def commit(self, shard_name: str, record: dict) -> None:
        """Write the commit marker after all of the shard's files exist."""
        self.write_json(f"{COMMITS}/{shard_name}.json", record)

    def commit_record(self, shard_name: str) -> dict | None:
        return self.read_json(f"{COMMITS}/{shard_name}.json")

    def committed(self) -> dict[str, dict]:
        """Commit markers by shard name."""
        pattern = self.path(COMMITS, "part-*.json")
        files = self.fs.glob(pattern)
        if not files:
            return {}
        blobs = self.fs.cat(files)
        return {posixpath.basename(f)[: -len(".json")]: json.loads(b) for f, b in blobs.items()}

    def committed_files(self, kind: str, commits: dict[str, dict] | None = None) -> list[str]:
        """The committed files of one kind, in shard order."""
        commits = self.committed() if commits is None else commits
        return [f["path"] for _, rec in sorted(commits.items()) for f in rec.get("files", [])
                if f["path"].startswith(f"{kind}/")]


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group so that one holds about ROW_GROUP_BYTES of `table` (uncompressed), at most 1Mi rows."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_BYTES // per_row))


class Lease:
    """One writer at a time: `_LEASE.json` names the owner (host, pid, start) and is refreshed while it runs.

    A lease is stale when not refreshed for `timeout` seconds, or when its owner is a process on this host that no
    longer exists (a killed job); a stale lease, or any lease with force (--overwrite), is taken over."""

    def __init__(self, folder: Folder, timeout: float, force: bool = False):
        self.folder, self.timeout, self.force = folder, timeout, force
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "started_at": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, held: dict) -> bool:
        if time.time() - held.get("refreshed_at", 0) > self.timeout:
            return True
        if held.get("host") == self.me["host"]:
            try:
                os.kill(int(held.get("pid", 0)), 0)
            except ProcessLookupError:
                return True  # its job was killed on this machine
            except (PermissionError, ValueError):
                return False
        return False

    def _write(self) -> None:
        self.folder.write_json(LEASE, self.me | {"refreshed_at": time.time()})

    def __enter__(self) -> "Lease":
        held = self.folder.read_json(LEASE)
        if held and held.get("token") != self.me["token"] and not self.force and not self._stale(held):
            age = time.time() - held.get("refreshed_at", 0)
            raise LeaseError(
                f"{self.folder.url} is in use by another job (host {held.get('host')}, pid {held.get('pid')}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.get('started_at', 0)))}, lease refreshed "
                f"{age:.0f} s ago); wait for it, or take over with --overwrite once it is gone (a lease unrefreshed "
                f"for run.lease_timeout={self.timeout:.0f} s is taken over by itself)")
        self._write()
        if (self.folder.read_json(LEASE) or {}).get("token") != self.me["token"]:  # lost a race to another starter
            raise LeaseError(f"{self.folder.url} was taken by another job starting at the same time")
        self._thread = threading.Thread(target=self._keep, daemon=True, name="igpt-lease")
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(max(1.0, self.timeout / 4)):
            try:
                self._write()
            except Exception as e:  # a store outage: the next refresh retries
                log.warning("could not refresh the lease on %s: %s", self.folder.url, type(e).__name__)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self.folder.read_json(LEASE) or {}).get("token") == self.me["token"]:
            self.folder.remove(LEASE)


def errors_by_reason(errors: pa.Table) -> Counter:
    """Count error rows by stage and the reason's class (no paths or URLs, so the summary stays small)."""
    from igpt_batch.errors import reason_class

    return Counter(f"{stage}: {reason_class(err)}"
                   for stage, err in zip(errors.column("stage").to_pylist(), errors.column("error").to_pylist()))


def read_output(url: str, kind: str = "embeddings", storage_options: dict | None = None) -> pa.Table:
    """Read the committed rows of one output kind (embeddings, samples, errors) as a pyarrow Table.

    Only parts named in _commits/ markers are read, so a job that is still running, or died mid-shard,
    never exposes half-written or stale data. Works for local folders and any fsspec URL.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = OutputFolder(url, storage_options)
    files = out.committed_files(kind)
    if not files:
        return pa.table({})
    return pa.concat_tables([out.read_table(f) for f in files], promote_options="default")
