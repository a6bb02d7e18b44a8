"""The fsspec output folder: the one owner of an output's layout (parts, commit markers, plan, job and status files)."""
from __future__ import annotations

import bisect
import json
import logging
import posixpath
import re
import threading
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from igpt_batch.errors import OutputError
from igpt_batch.inputs.manifest import shard_name, shard_width
from igpt_batch.run import planfile
from igpt_batch.run.lease import LEASE, Fence, Lease, check_fence
from igpt_batch.run.records import errors_by_reason, read_record

log = logging.getLogger(__name__)
KINDS = ("embeddings", "samples", "errors")
JOB, SUCCESS, FAILED, PLAN, COMMITS, PNGS = "_job.json", "_SUCCESS", "_FAILED", "_plan", "_commits", "pngs"
PICTURES = ("contact_sheet.png", "preview.png")
REPORT = "report.html"  # run/report.py
LANCE = "embeddings.lance"  # output.format: lance: the embeddings' one dataset (run/lance_output.py)
# all that --overwrite may remove (not the lease)
OURS = (JOB, SUCCESS, FAILED, PLAN, COMMITS, PNGS, *KINDS, *PICTURES, REPORT, LANCE)
ROW_GROUP_BYTES = 128 << 20  # parts' row groups, uncompressed: large enough for DuckDB, Spark and Ray Data
MAX_ROW_GROUP_ROWS = 1 << 20
_PLAN_LOCK = threading.Lock()
_TMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # write_bytes' temp files
_SHARD = re.compile(r"^part-(\d+)\.json$")
__all__ = ["Folder", "OutputFolder", "Lease", "LEASE", "errors_by_reason"]


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
    def _json(self, rel: str, kind: type = dict):
        """A JSON file of ours, or None if absent; OutputError naming the file if it is not valid `kind`."""
        try:
            obj = self.read_json(rel)
        except ValueError as e:
            raise OutputError(f"{posixpath.join(self.url, rel)} is not valid JSON ({e})") from None
        if obj is not None and not isinstance(obj, kind):
            raise OutputError(f"{posixpath.join(self.url, rel)} is malformed: a JSON {kind.__name__} was expected, "
                              f"found {type(obj).__name__}")
        return obj

    def read_job(self) -> dict | None:
        return self._json(JOB)

    @property
    def width(self) -> int:
        """Digits in this output's shard names: recorded in _job.json; 5 for outputs written before it was."""
        if getattr(self, "_width", None) is None:
            self._width = int((self.read_job() or {}).get("shard_width", 5))
        return self._width

    def start_job(self, job: dict) -> None:
        """Record this run's job (the rerun check reads it) and drop a previous run's status."""
        for status in (SUCCESS, FAILED):
            self.remove(status)
        job = {"shard_width": shard_width(job.get("shards", 0))} | job
        self._width = job["shard_width"]
        self.write_json(JOB, job)

    def finish(self, summary: dict, ok: bool, lease: Fence | None = None) -> None:
        """_SUCCESS (and the plan files removed) or _FAILED, written last, and only while `lease` is still ours."""
        if lease is not None:
            check_fence(self, lease)
        if ok:
            self.remove(PLAN)
        self.write_json(SUCCESS if ok else FAILED, summary)

    def end_job(self, lease: Fence | None = None) -> None:
        """However the job ended: remove the plan files (they hold fetchable URLs), unless the lease is no longer ours
        (the plan may then be the new holder's)."""
        if lease is not None and (self.read_json(LEASE) or {}).get("token") != lease.token:
            return
        self.remove(PLAN)

    def status(self) -> tuple[str, dict | None]:
        """('succeeded', summary) after _SUCCESS, ('failed', summary) after _FAILED, else ('running or stopped', None).
        OutputError names a status file that is not a JSON object."""
        for name, word in ((SUCCESS, "succeeded"), (FAILED, "failed")):
            summary = self._json(name)
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

    def sweep(self) -> int:
        """At start, under the lease: a killed run's temp files and plan files (its fetchable URLs) go."""
        self.remove(PLAN)
        return self.sweep_temp()

    # -- shards --------------------------------------------------------------
    def planned_shards(self) -> list[str]:
        """The names of every shard the job planned (from _job.json)."""
        n = int((self.read_job() or {}).get("shards", 0))
        return [shard_name(i, self.width) for i in range(n)]

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

    def commit(self, shard_name: str, record: dict, lease: Fence | None = None) -> None:
        """Write the commit marker after all of the shard's files exist. With `lease` (the job's fence), only while it
        is still the output's live lease (one read; LeaseError otherwise), and the record carries its token."""
        if lease is not None:
            check_fence(self, lease)
            record = record | {"lease": lease.record()}
        self.write_json(f"{COMMITS}/{shard_name}.json", record)

    def commit_record(self, shard_name: str) -> dict | None:
        try:
            raw = self.read_json(f"{COMMITS}/{shard_name}.json")
            return None if raw is None else read_record(raw)
        except ValueError:
            return None  # unreadable: not committed; the shard is recomputed

    def _name(self, marker: str) -> str:
        """A marker's shard name in this output's width (a resumed output of five-digit names keeps working)."""
        m = _SHARD.match(posixpath.basename(marker))
        return shard_name(int(m.group(1)), self.width) if m else posixpath.basename(marker)[: -len(".json")]

    def markers(self) -> tuple[dict[str, dict], dict[str, str]]:
        """(commit records by shard name, {marker file: why it cannot be read}): the tolerant reader (inspect)."""
        files = self.fs.glob(self.path(COMMITS, "part-*.json"))
        good, bad = {}, {}
        for f, blob in (self.fs.cat(files) if files else {}).items():
            try:
                good[self._name(f)] = read_record(json.loads(blob))
            except ValueError as e:
                rel = posixpath.join(COMMITS, posixpath.basename(f))
                bad[rel] = f"not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else f"malformed: {e}"
        return good, bad

    def committed(self) -> dict[str, dict]:
        """Commit records by shard name (normalised to v2). OutputError names a marker that cannot be read."""
        good, bad = self.markers()
        if bad:
            rel, why = next(iter(sorted(bad.items())))
            raise OutputError(f"{posixpath.join(self.url, rel)} is {why}; remove it to recompute that shard (an "
                              "output.format: lance output may already hold its rows: write it again with --overwrite)")
        return good

    def committed_files(self, kind: str, commits: dict[str, dict] | None = None) -> list[str]:
        """The committed files of one kind, in shard (manifest) order."""
        commits = self.committed() if commits is None else commits
        order = sorted(commits, key=lambda n: (len(n), n))  # equal widths sort by id; legacy names are shorter
        return [f["path"] for name in order for f in commits[name].get("files", []) if f["path"].startswith(f"{kind}/")]


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group so that one holds about ROW_GROUP_BYTES of `table` (uncompressed), at most 1Mi rows."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_BYTES // per_row))
