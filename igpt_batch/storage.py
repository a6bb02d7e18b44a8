"""The fsspec output folder: part files, commit markers, _job.json, _SUCCESS, and read_output()."""
from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from typing import Any, Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
KINDS = ("embeddings", "samples", "errors")
TRANSIENT = (OSError, TimeoutError, ConnectionError)


def retry(fn: Callable[[], Any], what: str, attempts: int = 6, base_delay: float = 0.5) -> Any:
    """Call fn, retrying transient I/O errors with exponential backoff (object stores flap)."""
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError):
            raise
        except TRANSIENT as e:
            if i == attempts - 1:
                raise
            delay = base_delay * 2**i
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)


class OutputFolder:
    """One output root on any fsspec filesystem; local disk and s3:// share this code path.

    Every file appears whole (temp file + rename locally, one PUT on object stores); a shard's data files come
    first and only then is _commits/part-SSSSS.json written. Readers trust only parts named in commit markers (read_output).
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- small files ---------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it."""
        final = self.path(rel)
        if self._is_local:
            # a hidden temp file beside the target, then an atomic rename; readers skip dot-files
            tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        else:
            retry(lambda: self.fs.pipe_file(final, data), f"write {rel}")  # an S3 PUT is atomic

    def read_json(self, rel: str) -> dict | None:
        try:
            return json.loads(retry(lambda: self.fs.cat_file(self.path(rel)), f"read {rel}"))
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def exists(self, rel: str) -> bool:
        return bool(retry(lambda: self.fs.exists(self.path(rel)), f"stat {rel}"))

    @property
    def _is_local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    # -- shards --------------------------------------------------------------
    def write_part(self, kind: str, shard_name: str, table: pa.Table) -> dict:
        """Write one shard's Parquet file for `kind`; a retried shard replaces the same name."""
        rel = f"{kind}/{shard_name}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(rel, sink.getvalue().to_pybytes())
        return {"path": rel, "rows": table.num_rows}

    def commit(self, shard_name: str, record: dict) -> None:
        """Write the commit marker after all of the shard's files exist."""
        self.write_json(f"_commits/{shard_name}.json", record)

    def committed(self) -> dict[str, dict]:
        """Commit markers by shard name."""
        pattern = self.path("_commits", "part-*.json")
        files = retry(lambda: self.fs.glob(pattern), "list commits")
        if not files:
            return {}
        blobs = retry(lambda: self.fs.cat(files), "read commits")
        return {posixpath.basename(f)[: -len(".json")]: json.loads(b) for f, b in blobs.items()}

    def read_table(self, rel: str) -> pa.Table:
        return retry(lambda: pq.read_table(self.path(rel), filesystem=self.fs), f"read {rel}")

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            retry(lambda: self.fs.rm(self.path(rel), recursive=True), f"remove {rel}")

    def clear(self) -> None:
        """Remove everything under the root (--overwrite)."""
        if self.fs.exists(self.root):
            for entry in self.fs.ls(self.root, detail=False):
                self.fs.rm(entry, recursive=True)


def committed_files(out: OutputFolder, kind: str) -> list[str]:
    files = []
    for name, record in sorted(out.committed().items()):
        files += [f["path"] for f in record.get("files", []) if f["path"].startswith(f"{kind}/")]
    return files


def errors_by_reason(errors: pa.Table) -> Counter:
    """Count error rows by stage and the reason's leading clause (the part before the first ':')."""
    return Counter(f"{stage}: {err.split(':')[0][:80]}"
                   for stage, err in zip(errors.column("stage").to_pylist(), errors.column("error").to_pylist()))


def read_output(url: str, kind: str = "embeddings", storage_options: dict | None = None) -> pa.Table:
    """Read the committed rows of one output kind (embeddings, samples, errors) as a pyarrow Table.

    Only parts named in _commits/ markers are read, so a job that is still running, or died mid-shard,
    never exposes half-written or stale data. Works for local folders and any fsspec URL.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = OutputFolder(url, storage_options)
    files = committed_files(out, kind)
    if not files:
        return pa.table({})
    tables = [pq.read_table(out.path(f), filesystem=out.fs) for f in files]
    return pa.concat_tables(tables, promote_options="default")
