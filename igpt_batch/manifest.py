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

from .fetch import redact_uri, scrub_secrets
from .manifest_files import ManifestError, read_batches

MANIFEST_EXTS = (".parquet", ".csv", ".jsonl", ".ndjson")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
BATCH_ROWS = 65_536  # manifest rows held at a time while planning
JSON_BLOCK_BYTES = 8 << 20  # JSONL is read in blocks of this size
OUTPUT_MARKER = "_job.json"  # a folder holding it is an igpt-batch output: never read as input


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


@dataclass(frozen=True)
class _Inputs:
    """What a manifest spec names: manifest files or image files, and the folder image ids are relative to."""

    fs: fsspec.AbstractFileSystem
    kind: str  # "manifests" | "images"
    files: list[str]
    base: str


def _expand(spec: str, storage_options: dict) -> _Inputs:
    try:
        return _list(spec, storage_options)
    except ManifestError:
        raise
    except PermissionError:  # never echo storage options: they hold the keys
        raise ManifestError(f"access denied to manifest {redact_uri(spec)}: check the storage credentials") from None
    except (TypeError, ValueError, AttributeError, ImportError, OSError) as e:  # options the filesystem rejects...
        why = scrub_secrets(f"{type(e).__name__}: {e}", storage_options)
        raise ManifestError(f"cannot open manifest {redact_uri(spec)} ({why}): check the URL and the storage options "
                            "(their names and types)") from None


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _list(spec: str, storage_options: dict) -> _Inputs:
    fs, path = fsspec.core.url_to_fs(spec, **storage_options)
    if any(c in path for c in "*?["):
        base = path[:min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0]
        outputs: dict[str, bool] = {}
        found = [f for f in sorted(fs.glob(path)) if not _excluded(fs, f, base, outputs)]
        return _classify(fs, spec, base, found, found)
    if fs.isdir(path):
        top, found = _walk(fs, path.rstrip("/"), spec)
        return _classify(fs, spec, path.rstrip("/"), top, found)
    if fs.exists(path):
        return _classify(fs, spec, posixpath.dirname(path), [path], [path])
    raise ManifestError(f"manifest not found: {redact_uri(spec)}")


def _excluded(fs: fsspec.AbstractFileSystem, path: str, base: str, outputs: dict[str, bool]) -> bool:
    """A glob match inside a _ or . folder, or inside an igpt-batch output folder (one holding _job.json)."""
    rel = path[len(base) + 1:] if base and path.startswith(base + "/") else path
    if any(_hidden(p) for p in rel.split("/")):
        return True
    folder = posixpath.dirname(path)
    while folder and folder.startswith(base):
        if folder not in outputs:
            outputs[folder] = fs.exists(posixpath.join(folder, OUTPUT_MARKER))
        if outputs[folder]:
            return True
        if folder == base or posixpath.dirname(folder) == folder:
            break
        folder = posixpath.dirname(folder)
    return False


def _walk(fs: fsspec.AbstractFileSystem, root: str, spec: str) -> tuple[list[str], list[str]]:
    """(files at the top level, all files) under root, never entering _ or . folders or igpt-batch outputs."""
    top: list[str] | None = None
    found: list[str] = []
    for folder, dirs, files in fs.walk(root, topdown=True, detail=False):
        if OUTPUT_MARKER in files:
            if top is None:
                raise ManifestError(f"{redact_uri(spec)} is an igpt-batch output (it holds {OUTPUT_MARKER}), not input: "
                                    "pass the manifest or the images it was made from")
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not _hidden(d)]  # pruned in place: fsspec's walk then skips them
        paths = [posixpath.join(folder, f) for f in files if not _hidden(f)]
        top = paths if top is None else top
        found += paths
    return top or [], sorted(found)


def _classify(fs, spec: str, base: str, top: list[str], found: list[str]) -> _Inputs:
    """Manifest files when the top level holds them and no images; else images (at any depth)."""
    is_manifest = lambda f: f.lower().endswith(MANIFEST_EXTS)  # noqa: E731
    is_image = lambda f: f.lower().endswith(IMAGE_EXTS)  # noqa: E731
    top_manifests, top_images = [f for f in top if is_manifest(f)], [f for f in top if is_image(f)]
    if top_manifests and top_images:
        names = lambda fs_: ", ".join(posixpath.basename(f) for f in fs_[:3]) + (", ..." if len(fs_) > 3 else "")  # noqa: E731
        ext = posixpath.splitext(top_images[0])[1]
        raise ManifestError(f"{redact_uri(spec)} holds both manifest files ({names(top_manifests)}) and images "
                            f"({names(top_images)}): pass the manifest file itself (e.g. "
                            f"{redact_uri(fs.unstrip_protocol(top_manifests[0]))}) or a glob of the images "
                            f"(e.g. '{redact_uri(fs.unstrip_protocol(posixpath.join(base, '*' + ext)))}')")
    manifests, images = [f for f in found if is_manifest(f)], [f for f in found if is_image(f)]
    if top_manifests or (manifests and not images):
        return _Inputs(fs, "manifests", manifests, base)
    if images:
        return _Inputs(fs, "images", images, base)
    raise ManifestError(f"no manifest or image files found at {redact_uri(spec)}")


def iter_manifest(spec: str, storage_options: dict | None = None) -> Iterator[pa.Table]:
    """Yield the manifest as tables of string columns `id` and `uri`, a batch at a time, never all at once.

    `spec` is a manifest file, a folder or glob of manifest files, or a folder or glob of image files.
    A missing `id` column is derived from `uri` (the uri itself); an image's id is its path relative to the
    folder (or the glob's fixed part), so moving the mount does not change ids. Relative local uris are
    resolved against the manifest's folder.
    """
    inputs = _expand(spec, storage_options or {})
    if inputs.kind == "images":
        yield from _image_tables(inputs)
        return
    for path in inputs.files:
        for t in read_batches(inputs.fs, path, BATCH_ROWS, JSON_BLOCK_BYTES):
            uris = _resolve_uris(inputs.fs, path, t.column("uri"))
            ids = t.column("id") if "id" in t.column_names else uris
            if _has_empty(t.column("uri")) or _has_empty(ids):
                raise ManifestError(f"manifest {path} has empty 'uri' or 'id' values")
            yield pa.table({"id": ids, "uri": uris})


def _has_empty(column: pa.ChunkedArray) -> bool:
    import pyarrow.compute as pc

    return bool(column.null_count) or (len(column) > 0 and pc.min(pc.binary_length(column)).as_py() == 0)


def _image_tables(inputs: _Inputs) -> Iterator[pa.Table]:
    local = "file" in inputs.fs.protocol
    for i in range(0, len(inputs.files), BATCH_ROWS):
        files = inputs.files[i:i + BATCH_ROWS]
        uris = [_file_uri(f) if local else inputs.fs.unstrip_protocol(f) for f in files]
        ids = [_relative_id(f, inputs.base) for f in files]
        yield pa.table({"id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())})


def _relative_id(path: str, base: str) -> str:
    rel = path[len(base) + 1:] if base and path.startswith(base.rstrip("/") + "/") else posixpath.basename(path)
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:  # undecodable bytes in a file name: percent-encoded, like its uri
        return urllib.parse.quote(os.fsencode(rel))


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
