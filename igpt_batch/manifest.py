"""Read image manifests (Parquet/CSV/JSONL, folders, globs, or plain image folders) and plan shards."""
from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa

MANIFEST_EXTS = (".parquet", ".csv", ".jsonl", ".ndjson")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
BATCH_ROWS = 65_536  # manifest rows held at a time while planning
JSON_BLOCK_BYTES = 8 << 20  # JSONL is parsed in blocks of this size (column types are inferred from the first)


class ManifestError(ValueError):
    """A manifest that cannot be used; raised before any model is loaded."""


@dataclass(frozen=True)
class Shard:
    """A unit of work, output and commit: rows [start, stop) of the manifest, or seeds [start, stop)."""

    shard_id: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.shard_id:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int, first: int = 0) -> list[Shard]:
    """Split [first, first+n) into consecutive shards; a pure function of (n, shard_size, first)."""
    return [Shard(i, first + s, first + min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]


def _expand(spec: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    try:
        return _list(spec, storage_options)
    except PermissionError:  # never echo storage options: they hold the keys
        raise ManifestError(f"access denied to manifest {spec}: check the storage credentials") from None


def _list(spec: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = fsspec.core.url_to_fs(spec, **storage_options)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(f for f in fs.find(path) if not posixpath.basename(f).startswith((".", "_")))
    elif fs.exists(path):
        files = [path]
    else:
        raise ManifestError(f"manifest not found: {spec}")
    return fs, files


def _read_batches(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[pa.Table]:
    """Stream one manifest file in record batches (Parquet, CSV and JSONL alike)."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            if path.endswith(".parquet"):
                for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
                    yield pa.Table.from_batches([batch])
            elif path.endswith(".csv"):
                for batch in pcsv.open_csv(f):
                    yield pa.Table.from_batches([batch])
            else:
                for batch in pjson.open_json(f, read_options=pjson.ReadOptions(block_size=JSON_BLOCK_BYTES)):
                    yield pa.Table.from_batches([batch])
    except PermissionError as e:
        raise ManifestError(f"cannot read manifest {path}: permission denied") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e


def iter_manifest(spec: str, storage_options: dict | None = None) -> Iterator[pa.Table]:
    """Yield the manifest as tables of string columns `id` and `uri`, a batch at a time, never all at once.

    `spec` is a manifest file, a folder or glob of manifest files, or a folder or glob of image files.
    A missing `id` column is derived from `uri` (the uri itself). Relative local uris are resolved against
    the manifest's folder.
    """
    fs, files = _expand(spec, storage_options or {})
    manifests = [f for f in files if f.lower().endswith(MANIFEST_EXTS)]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTS)]
    if manifests:
        for path in manifests:
            for t in _read_batches(fs, path):
                if "uri" not in t.column_names:
                    raise ManifestError(f"manifest {path} has no 'uri' column (columns: {', '.join(t.column_names) or 'none'})")
                uris = _resolve_uris(fs, path, t.column("uri").cast(pa.string()))
                ids = t.column("id").cast(pa.string()) if "id" in t.column_names else uris
                if uris.null_count or ids.null_count:
                    raise ManifestError(f"manifest {path} has empty 'uri' or 'id' values")
                yield pa.table({"id": ids, "uri": uris})
    elif images:
        for i in range(0, len(images), BATCH_ROWS):
            uris = [_file_uri(f) if "file" in fs.protocol else fs.unstrip_protocol(f) for f in images[i:i + BATCH_ROWS]]
            yield pa.table({"id": pa.array(uris, pa.string()), "uri": pa.array(uris, pa.string())})
    else:
        raise ManifestError(f"no manifest or image files found at {spec}")


@dataclass(frozen=True)
class ManifestScan:
    rows: int
    fingerprint: str  # of the (id, uri) values, independent of file and batch boundaries


class _ColumnHash:
    """sha256 of a string column's lengths and of its bytes, fed chunk by chunk, independent of chunking."""

    def __init__(self):
        self.lengths, self.data = hashlib.sha256(), hashlib.sha256()

    def update(self, column: pa.ChunkedArray) -> None:
        import pyarrow.compute as pc

        for chunk in column.chunks:
            chunk = chunk.cast(pa.large_string())  # one layout (int64 offsets) whatever the reader produced
            self.lengths.update(pc.binary_length(chunk).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
            lo, hi = int(offsets[chunk.offset]), int(offsets[chunk.offset + len(chunk)])
            if hi > lo:
                self.data.update(memoryview(chunk.buffers()[2])[lo:hi])

    def digest(self) -> bytes:
        return self.lengths.digest() + self.data.digest()


def scan_manifest(spec: str, storage_options: dict | None = None) -> ManifestScan:
    """One streaming pass: row count, fingerprint and the duplicate-id check, holding 8 bytes per row.

    Raises ManifestError for an empty manifest and for duplicate ids (an error: ids must be unique).
    """
    h_id, h_uri = _ColumnHash(), _ColumnHash()
    rows, hashes = 0, []
    for t in iter_manifest(spec, storage_options):
        rows += t.num_rows
        h_id.update(t.column("id"))
        h_uri.update(t.column("uri"))
        hashes.append(np.fromiter((hash(i) for i in t.column("id").to_pylist()), dtype=np.int64, count=t.num_rows))
    if rows == 0:
        raise ManifestError(f"manifest {spec} is empty: no rows to process")
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    if (counts > 1).any():  # 64-bit hashes can collide: confirm on the few suspects, exactly
        suspects, seen, dups = set(values[counts > 1].tolist()), set(), {}
        for t in iter_manifest(spec, storage_options):
            for i in t.column("id").to_pylist():
                if hash(i) in suspects:
                    if i in seen:
                        dups[i] = True
                    seen.add(i)
        if dups:
            names = ", ".join(repr(v) for v in list(dups)[:5])
            raise ManifestError(f"manifest {spec} has {len(dups)} duplicate ids (e.g. {names}); ids must be unique")
    return ManifestScan(rows, hashlib.sha256(h_id.digest() + h_uri.digest()).hexdigest()[:16])


def read_manifest(spec: str, storage_options: dict | None = None) -> pa.Table:
    """The whole manifest as one (id, uri) table, after scan_manifest's checks (for callers that need it all)."""
    scan_manifest(spec, storage_options)
    return pa.concat_tables(iter_manifest(spec, storage_options))


def write_plan(spec: str, storage_options: dict | None, shard_size: int, shards: list[Shard],
               write: Callable[[Shard, pa.Table], None]) -> None:
    """Stream the manifest again and hand each shard in `shards` its rows; shard i is rows [i*size, (i+1)*size)."""
    wanted = {s.shard_id: s for s in shards}
    buffer: list[pa.Table] = []
    buffered = shard_id = 0
    for t in iter_manifest(spec, storage_options):
        while t.num_rows:
            take = min(shard_size - buffered, t.num_rows)
            buffer.append(t.slice(0, take))
            buffered, t = buffered + take, t.slice(take)
            if buffered == shard_size:
                if shard_id in wanted:
                    write(wanted[shard_id], pa.concat_tables(buffer))
                buffer, buffered, shard_id = [], 0, shard_id + 1
    if buffered and shard_id in wanted:
        write(wanted[shard_id], pa.concat_tables(buffer))


def _file_uri(path: str) -> str:
    """A local path as a manifest uri: itself, or a percent-encoded file:// URL when it is not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogateescape)
        return "file://" + urllib.parse.quote(os.fsencode(path))


def _resolve_uris(fs: fsspec.AbstractFileSystem, manifest_path: str, uris: pa.ChunkedArray) -> pa.ChunkedArray:
    """Resolve relative uris against the manifest's folder, column-wise in Arrow (no per-row Python objects,
    so planning a large manifest costs about its own size in memory)."""
    import pyarrow.compute as pc

    base = posixpath.dirname(manifest_path)
    if "file" not in fs.protocol:
        base = fs.unstrip_protocol(base)
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    joined = pc.binary_join_element_wise(pa.scalar(base), uris, "/")
    return pc.if_else(pc.or_kleene(absolute, pc.is_null(uris)), uris, joined)
