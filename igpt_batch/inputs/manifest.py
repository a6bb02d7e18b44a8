"""Read image manifests (Parquet/CSV/JSONL, folders, globs, image folders, WebDataset tars), scan them and plan shards.

A job reads its inputs once (`Inputs`): one listing and one streaming pass count, fingerprint and check the rows,
decide the input kind, and keep the rows in a local Arrow file for the overlap guard, the plan files and the pictures.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from igpt_batch.errors import JobError, ManifestError
from igpt_batch.inputs import tars
from igpt_batch.inputs.listing import Listing, list_inputs
from igpt_batch.inputs.manifest_files import (
    BATCH_ROWS,
    ColumnHash,
    Columns,
)
from igpt_batch.inputs.units import file_tables, image_tables
from igpt_batch.redact import redact_uri

KINDS = ("uri", "bytes", "tar")  # the input kind: how a worker gets a row's image (fetch the uri; decode the bytes the
# plan rows carry; read the member of the tar its uri names)


@dataclass(frozen=True)
class Shard:
    """A unit of work, output and commit: rows [start, stop) of the manifest, or seeds [start, stop)."""

    shard_id: int
    start: int
    stop: int
    width: int = 5  # digits of the name: shard_width(number of shards), so names sort in plan order at any count

    @property
    def name(self) -> str:
        return shard_name(self.shard_id, self.width)

    def __len__(self) -> int:
        return self.stop - self.start


def shard_width(count: int) -> int:
    """Digits in a shard name: 5 (outputs written before this was recorded), more past 99,999 shards."""
    return max(5, len(str(max(count - 1, 0))))


def shard_name(shard_id: int, width: int = 5) -> str:
    """The one spelling of a shard's name (part-00042): its files, plan and commit marker are named after it."""
    return f"part-{shard_id:0{width}d}"


def plan_shards(n: int, shard_size: int, first: int = 0) -> list[Shard]:
    """Split [first, first+n) into consecutive shards; a pure function of (n, shard_size, first)."""
    starts = range(0, n, shard_size)
    return [Shard(i, first + s, first + min(s + shard_size, n), shard_width(len(starts))) for i, s in enumerate(starts)]


def iter_manifest(spec: str, storage_options: dict | None = None, columns: Columns = Columns(),
                  digest: bool = False) -> Iterator[pa.Table]:
    """Yield the manifest as tables of string columns `id` and `uri`, a batch at a time, never all at once.

    `spec` is a manifest file, a folder or glob of manifest files, a folder or glob of image files, or WebDataset
    tars (a folder, a glob, or a brace range such as shards/{00000..00099}.tar: one table per tar, with a
    `member` column). `columns` names the id, uri and image-bytes columns (then a binary `bytes` column comes too, and a
    missing uri is `<manifest>#<row>`). A missing `id` is the uri itself; an image's id is its path relative to the
    folder (or the glob's fixed part), so moving the mount does not change ids. Relative local uris are resolved
    against the manifest's folder. With `digest`, a tar's tables carry each image's `sha256` too.
    """
    yield from _tables(list_inputs(spec, storage_options or {}), columns, digest=digest)


def _tables(inputs: Listing, columns: Columns, digest: bool) -> Iterator[pa.Table]:
    if inputs.holds == "images":
        yield from image_tables(inputs.fs, inputs.files, inputs.base)
    elif inputs.holds == "tars":
        yield from (tars.index_table(inputs.fs, path, digest) for path in inputs.files)
    else:
        for path in inputs.files:
            yield from file_tables(inputs.fs, path, columns)


@dataclass(frozen=True)
class ManifestScan:
    """What one pass over the inputs found: rows, fingerprint, rows per tar, and the input kind (one of KINDS)."""

    rows: int
    fingerprint: str  # of the (id, uri) values and the images' content when the input holds them
    groups: tuple[int, ...] = ()  # rows per tar (WebDataset input): no shard crosses a tar
    kind: str = "uri"

    def shards(self, shard_size: int) -> list[Shard]:
        """The shard plan: row ranges of shard_size; for tars, each tar cut on its own (one tar, one reader)."""
        if not self.groups:
            return plan_shards(self.rows, shard_size)
        out, first = [], 0
        for n in self.groups:
            out += [Shard(len(out) + i, s.start, s.stop) for i, s in enumerate(plan_shards(n, shard_size, first))]
            first += n
        return [Shard(s.shard_id, s.start, s.stop, shard_width(len(out))) for s in out]


def scan_manifest(spec: str, storage_options: dict | None = None, columns: Columns = Columns()) -> ManifestScan:
    """One streaming pass: row count, fingerprint and the duplicate-id check, holding 8 bytes per row.

    Raises ManifestError for an empty manifest and for duplicate ids (an error: ids must be unique).
    """
    listing = list_inputs(spec, storage_options or {})
    again = lambda: _tables(listing, Columns(columns.id, columns.uri), False)  # noqa: E731  (only on suspects)
    return _scan(spec, listing, columns, None, again)


def _scan(spec: str, listing: Listing, columns: Columns, keep: Callable[[pa.Table], None] | None,
          again: Callable[[], Iterator[pa.Table]]) -> ManifestScan:
    """The scan over `listing`, handing each table of rows to `keep` (when given) as it streams past."""
    h_id, h_uri, h_content = ColumnHash(), ColumnHash(), ColumnHash()
    rows, hashes, groups = 0, [], []
    for t in _tables(listing, columns, digest=True):
        rows += t.num_rows
        groups.append(t.num_rows)
        h_id.update(t.column("id"))
        h_uri.update(t.column("uri"))
        for content in ("bytes", "sha256"):  # a changed image changes the fingerprint, so a rerun recomputes it
            if content in t.column_names:
                h_content.update(t.column(content))
        hashes.append(id_hashes(t.column("id")))
        if keep is not None:
            keep(t.drop_columns([c for c in ("sha256",) if c in t.column_names]))
    if rows == 0:
        raise ManifestError(f"manifest {redact_uri(spec)} is empty: no rows to process")
    _check_duplicates(spec, np.concatenate(hashes), again)
    # tars, or a Parquet manifest naming tar members (input.member_column: refresh's night manifest)
    kind = "tar" if listing.holds == "tars" or columns.member else "bytes" if columns.bytes else "uri"
    content = h_content.digest() if kind != "uri" else b""
    fingerprint = hashlib.sha256(h_id.digest() + h_uri.digest() + content).hexdigest()[:16]
    return ManifestScan(rows, fingerprint, tuple(groups) if listing.holds == "tars" else (), kind)


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each id (Python's, of the string): what repeated_ids sorts."""
    return np.fromiter((hash(i) for i in ids.to_pylist()), dtype=np.int64, count=len(ids))


def repeated_ids(hashes: np.ndarray, tables: Callable[[], Iterable[pa.Table]]) -> list[str]:
    """The ids that occur more than once, in the order met: `hashes` (id_hashes of every row, 8 bytes a row) sorted in
    place, then, as 64-bit hashes can collide, the few suspects confirmed exactly over the id columns of `tables()`."""
    hashes.sort()
    repeated = hashes[1:] == hashes[:-1]
    if not repeated.any():
        return []
    suspects, seen, dups = set(hashes[1:][repeated].tolist()), set(), {}
    for t in tables():
        for i in t.column("id").to_pylist():
            if hash(i) in suspects:
                if i in seen:
                    dups[i] = True
                seen.add(i)
    return list(dups)


def _check_duplicates(spec: str, hashes: np.ndarray, tables: Callable[[], Iterator[pa.Table]]) -> None:
    dups = repeated_ids(hashes, tables)
    if dups:
        names = ", ".join(repr(v) for v in dups[:5])
        raise ManifestError(f"manifest {redact_uri(spec)} has {len(dups)} duplicate ids (e.g. {names}); ids must be unique")


class Inputs:
    """One job's inputs, listed and read once: the scan, and the rows (id, uri and a tar `member` or the image
    `bytes`) kept in a local Arrow file (under TMPDIR) until `close`, so that the overlap guard, the plan files and
    the pictures never list or read the source again. `head` holds the first rows' id and uri (for pictures)."""

    def __init__(self, spec: str, storage_options: dict | None = None, columns: Columns = Columns(),
                 on_rows: Callable[[int], None] | None = None):
        """`on_rows(n)`: told of each table of n rows as the scan reads it (the driver starts Ray meanwhile)."""
        listing = list_inputs(spec, storage_options or {})
        _sweep_killed()
        self.folder = tempfile.mkdtemp(prefix=f"igpt-inputs-{os.getpid()}-")
        self.path, self._writer, self._schema = os.path.join(self.folder, "rows.arrow"), None, None

        def keep(t: pa.Table) -> None:
            self._keep(t)
            if on_rows is not None:
                on_rows(t.num_rows)

        try:
            self.scan = _scan(spec, listing, columns, keep, lambda: self.tables(read_all=False))
            first = next(self.tables())  # copied: it outlives the kept rows
            self.head = first.select(["id", "uri"]).take(pa.array(range(first.num_rows), pa.int64()))
        except BaseException:
            self.close()
            raise

    def _keep(self, t: pa.Table) -> None:
        try:
            if self._writer is None:
                options = pa.ipc.IpcWriteOptions(compression="zstd")
                self._schema = t.schema
                self._writer = pa.ipc.new_file(self.path, t.schema, options=options)
            self._writer.write_table(t.cast(self._schema), max_chunksize=BATCH_ROWS)
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
            raise JobError(f"cannot keep the manifest's rows in {self.folder} ({why}): point TMPDIR at a folder "
                           "with room") from None

    def tables(self, read_all: bool = True) -> Iterator[pa.Table]:
        """The rows as they were read, a batch at a time (read_all=False: the duplicate check's id and uri only)."""
        if self._writer is not None:  # the scan is over: the file is complete
            self._writer.close()
            self._writer = None
        with pa.memory_map(self.path) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                yield pa.Table.from_batches([batch if read_all else batch.select(["id", "uri"])])

    def close(self) -> None:
        """Remove the kept rows (the plan files hold what the workers need); safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Inputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sweep_killed() -> None:
    """Remove the kept rows a killed driver left under TMPDIR (they hold fetchable URLs): folders named by the pid
    of a process that is gone."""
    for entry in os.scandir(tempfile.gettempdir()):
        m = re.fullmatch(r"igpt-inputs-(\d+)-.+", entry.name)
        if m and entry.is_dir(follow_symlinks=False):
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
            except (PermissionError, OverflowError):
                pass  # another user's live process, or not a pid: not ours to judge


def read_manifest(spec: str, storage_options: dict | None = None, columns: Columns = Columns()) -> pa.Table:
    """The whole manifest as one (id, uri) table, after the scan's checks (for callers that need it all)."""
    with Inputs(spec, storage_options, columns) as inputs:
        return pa.concat_tables(inputs.tables())


def write_plan(tables: Iterable[pa.Table], shards: list[Shard], write: Callable[[Shard, pa.Table], None]) -> None:
    """Hand each shard in `shards` its rows [start, stop) from `tables` (the rows in order); reading stops after
    the last one."""
    todo, k, row, parts = sorted(shards, key=lambda s: s.start), 0, 0, []
    for t in tables:
        end = row + t.num_rows
        while k < len(todo) and todo[k].start < end:
            s = todo[k]
            lo, hi = max(s.start, row), min(s.stop, end)
            if hi > lo:
                parts.append(t.slice(lo - row, hi - lo))
            if s.stop > end:
                break
            write(s, pa.concat_tables(parts))
            parts, k = [], k + 1
        row = end
        if k == len(todo):
            return
