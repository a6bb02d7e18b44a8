"""Read image manifests (Parquet/CSV/JSONL, folders, globs, or plain image folders) and plan shards."""
from __future__ import annotations

import os
import posixpath
import urllib.parse
from dataclasses import dataclass

import fsspec
import pyarrow as pa

MANIFEST_EXTS = (".parquet", ".csv", ".jsonl", ".ndjson")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


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


def _read_one(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            if path.endswith(".parquet"):
                return pq.read_table(f)
            if path.endswith(".csv"):
                return pcsv.read_csv(f)
            return pjson.read_json(f)
    except PermissionError as e:
        raise ManifestError(f"cannot read manifest {path}: permission denied") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e


def read_manifest(spec: str, storage_options: dict | None = None) -> pa.Table:
    """Return a table with string columns `id` and `uri`, one row per input image.

    `spec` is a manifest file, a folder or glob of manifest files, or a folder or glob of image files.
    A missing `id` column is derived from `uri` (the uri itself). Relative local uris are resolved against
    the manifest's folder. Duplicate ids are an error (see README: inputs must name each image once).
    """
    storage_options = storage_options or {}
    fs, files = _expand(spec, storage_options)
    manifests = [f for f in files if f.lower().endswith(MANIFEST_EXTS)]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTS)]
    if manifests:
        tables = []
        for path in manifests:
            t = _read_one(fs, path)
            if "uri" not in t.column_names:
                raise ManifestError(f"manifest {path} has no 'uri' column (columns: {', '.join(t.column_names) or 'none'})")
            uris = [_resolve_uri(fs, path, u) for u in t.column("uri").cast(pa.string()).to_pylist()]
            ids = t.column("id").cast(pa.string()).to_pylist() if "id" in t.column_names else uris
            tables.append(pa.table({"id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())}))
        table = pa.concat_tables(tables)
    elif images:
        uris = [_file_uri(f) if "file" in fs.protocol else fs.unstrip_protocol(f) for f in images]
        table = pa.table({"id": pa.array(uris, pa.string()), "uri": pa.array(uris, pa.string())})
    else:
        raise ManifestError(f"no manifest or image files found at {spec}")
    if table.num_rows == 0:
        raise ManifestError(f"manifest {spec} is empty: no rows to process")
    if table.column("uri").null_count or table.column("id").null_count:
        raise ManifestError(f"manifest {spec} has empty 'uri' or 'id' values")
    _check_unique(table, spec)
    return table


def _file_uri(path: str) -> str:
    """A local path as a manifest uri: itself, or a percent-encoded file:// URL when it is not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogateescape)
        return "file://" + urllib.parse.quote(os.fsencode(path))


def _resolve_uri(fs: fsspec.AbstractFileSystem, manifest_path: str, uri: str | None) -> str | None:
    if uri is None or "://" in uri or uri.startswith("/"):
        return uri
    base = posixpath.dirname(manifest_path)
    joined = posixpath.join(base, uri)
    return joined if "file" in fs.protocol else fs.unstrip_protocol(joined)


def _check_unique(table: pa.Table, spec: str) -> None:
    import pyarrow.compute as pc

    counts = pc.value_counts(table.column("id"))
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        names = ", ".join(repr(v) for v in dup.field("values").to_pylist()[:5])
        raise ManifestError(f"manifest {spec} has {len(dup)} duplicate ids (e.g. {names}); ids must be unique")
