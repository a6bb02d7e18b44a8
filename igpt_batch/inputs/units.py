"""A manifest cut into units that tasks read on their own: a Parquet file's row groups [lo, hi), a whole CSV/JSONL
file or tar, or a slice of listed image files. Each unit knows the order key of its first row, so rows keep the
manifest's order without a unit knowing how many rows come before it: a file's rows are keyed `file index << 32 |
row in the file`, listed images by their position in the listing (the keys sort in manifest order; they are not
dense)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa

from igpt_batch.errors import ManifestError
from igpt_batch.inputs import tars
from igpt_batch.inputs.listing import Listing
from igpt_batch.inputs.manifest_files import (
    BATCH_ROWS,
    JSON_BLOCK_BYTES,
    Columns,
    file_uri,
    name_of,
    read_batches,
    relative_id,
    resolve_uris,
)
from igpt_batch.redact import redact_uri

FILE_SHIFT = 32  # a file's rows are keyed file index << FILE_SHIFT | row in the file
# bytes a row at least, to guess the rows of a file whose footer does not say (CSV, JSONL, tars): a guess only sizes
# the planning buckets (too many rows guessed: smaller buckets), never what is planned
MIN_ROW_BYTES = {"csv": 24, "jsonl": 32, "ndjson": 32, "tar": 1024}
FOOTER_THREADS = 16  # Parquet footers (and sizes) read at once: on an object store, one request or two a file


@dataclass(frozen=True)
class Unit:
    """One task's part of the manifest."""

    index: int  # in manifest order
    key: int  # the order key of its first row
    path: str = ""  # the manifest file or tar ("" for images)
    groups: tuple[int, int] | None = None  # Parquet: row groups [lo, hi); None: the whole file
    first_row: int = 0  # the unit's first row in its file (Parquet row groups)
    files: tuple[str, ...] = ()  # images: the image files
    rows: int = 0  # rows, or a guess when `guessed`
    guessed: bool = False


def units(listing: Listing, target_rows: int) -> list[Unit]:
    """The listing cut into units of about target_rows rows (a CSV/JSONL file or a tar is one unit, whatever its
    size). Parquet files' footers are read here; other files' rows are guessed from their size."""
    if listing.holds == "images":
        starts = range(0, len(listing.files), target_rows)
        return [Unit(i, lo, files=tuple(listing.files[lo:lo + target_rows]), rows=min(target_rows, len(listing.files) - lo))
                for i, lo in enumerate(starts)]
    out: list[Unit] = []
    with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="igpt-footers") as pool:  # a request or two a file
        found = pool.map(lambda p: _rows_of(listing.fs, p), listing.files)
        for f, (path, sizes) in enumerate(zip(listing.files, found)):
            key = f << FILE_SHIFT
            if isinstance(sizes, int):
                out.append(Unit(len(out), key, path, rows=sizes, guessed=True))
                continue
            lo, first, acc = 0, 0, 0
            for g, rows in enumerate(sizes):
                acc += rows
                if g + 1 == len(sizes) or acc + sizes[g + 1] > target_rows:
                    out.append(Unit(len(out), key + first, path, (lo, g + 1), first, rows=acc))
                    lo, first, acc = g + 1, first + acc, 0
    return out


def _rows_of(fs: fsspec.AbstractFileSystem, path: str) -> list[int] | int:
    """A Parquet file's rows in each row group, or else a guess of the file's rows from its size."""
    ext = name_of(path).rpartition(".")[2]
    sizes = _row_groups(fs, path) if ext == "parquet" else None
    return sizes if sizes is not None else max(1, _size(fs, path) // MIN_ROW_BYTES.get(ext, 24))


def _row_groups(fs: fsspec.AbstractFileSystem, path: str) -> list[int] | None:
    """Rows in each row group of a Parquet file, from its footer; None when it cannot be read (the unit's task
    then reads the whole file, and says why it cannot)."""
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] or None
    except Exception:  # noqa: BLE001 - whatever it is, the task reading the file reports it as a manifest error
        return None


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    try:
        return int(fs.size(path) or 0)
    except Exception:  # noqa: BLE001 - only a guess: the task reading the file reports what is wrong with it
        return 0


def unit_tables(listing: Listing, unit: Unit, columns: Columns, digest: bool) -> Iterator[tuple[int, pa.Table]]:
    """(order key of the first row, rows) of one unit, a batch at a time."""
    if listing.holds == "images":
        key = unit.key
        for t in image_tables(listing.fs, unit.files, listing.base):
            yield key, t
            key += t.num_rows
    elif listing.holds == "tars":
        yield unit.key, tars.index_table(listing.fs, unit.path, digest)
    else:
        key = unit.key
        for t in file_tables(listing.fs, unit.path, columns, unit.groups, unit.first_row):
            yield key, t
            key += t.num_rows


def file_tables(fs: fsspec.AbstractFileSystem, path: str, columns: Columns, groups: tuple[int, int] | None = None,
                first_row: int = 0) -> Iterator[pa.Table]:
    """One manifest file's rows (or its Parquet row groups [lo, hi), whose first row is `first_row`) as tables of
    id, uri (and bytes, member); a ManifestError for empty ids or uris."""
    import pyarrow.compute as pc

    row = first_row
    for t in read_batches(fs, path, BATCH_ROWS, JSON_BLOCK_BYTES, columns, groups, first_row):
        if "uri" in t.column_names:
            uris = resolve_uris(fs, path, t.column("uri"))
        else:  # images inside the manifest, which names no uri: where the row is
            url = path if "file" in fs.protocol else fs.unstrip_protocol(path)
            rows = pa.array(np.arange(row, row + t.num_rows)).cast(pa.string())
            uris = pc.binary_join_element_wise(pa.scalar(f"{url}#"), rows, "")
        ids = t.column("id") if "id" in t.column_names else uris
        if ("uri" in t.column_names and _has_empty(t.column("uri"))) or _has_empty(ids):
            raise ManifestError(f"manifest {redact_uri(path)} has empty '{columns.uri}' or '{columns.id}' values")
        row += t.num_rows
        extra = {c: t.column(c) for c in ("bytes", "member") if c in t.column_names}
        yield pa.table({"id": ids, "uri": uris, **extra})


def _has_empty(column: pa.ChunkedArray) -> bool:
    import pyarrow.compute as pc

    return bool(column.null_count) or (len(column) > 0 and pc.min(pc.binary_length(column)).as_py() == 0)


def image_tables(fs: fsspec.AbstractFileSystem, files: list[str] | tuple[str, ...], base: str) -> Iterator[pa.Table]:
    """Listed image files as tables of id (the path relative to `base`) and uri."""
    local = "file" in fs.protocol
    for i in range(0, len(files), BATCH_ROWS):
        chunk = files[i:i + BATCH_ROWS]
        uris = [file_uri(f) if local else fs.unstrip_protocol(f) for f in chunk]
        yield pa.table({"id": pa.array([relative_id(f, base) for f in chunk], pa.string()),
                        "uri": pa.array(uris, pa.string())})
