"""Read image manifests (Parquet/CSV/JSONL, folders, globs, image folders, WebDataset tars) and plan shards."""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa

from igpt_batch.errors import ManifestError
from igpt_batch.inputs import tars
from igpt_batch.inputs.manifest_files import ColumnHash, Columns, file_uri, read_batches, relative_id, resolve_uris
from igpt_batch.redact import redact_uri, scrub_secrets

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


@dataclass(frozen=True)
class _Inputs:
    """What a manifest spec names: manifest files or image files, and the folder image ids are relative to."""

    fs: fsspec.AbstractFileSystem
    kind: str  # "manifests" | "images" | "tars"
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
    if tars.has_braces(spec):  # WebDataset's shards/{00000..00099}.tar: each one must exist
        urls = tars.expand_braces(spec)
        fs, first = fsspec.core.url_to_fs(urls[0], **storage_options)
        paths = [first] + [fsspec.core.url_to_fs(u, **storage_options)[1] for u in urls[1:]]
        missing = [u for u, p in zip(urls, paths) if not fs.exists(p)]
        if missing:
            raise ManifestError(f"{len(missing)} of {len(urls)} tars not found (e.g. {redact_uri(missing[0])})")
        return _classify(fs, spec, posixpath.dirname(first), paths, paths)
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
    """Manifest files when the top level holds them and no images; else images (at any depth); else tars."""
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
    tar_files = [f for f in found if f.lower().endswith(tars.TAR_EXTS)]
    if tar_files:
        return _Inputs(fs, "tars", tar_files, base)  # in the order named (brace ranges) or listed
    raise ManifestError(f"no manifest or image files found at {redact_uri(spec)}")


def iter_manifest(spec: str, storage_options: dict | None = None, columns: Columns = Columns()) -> Iterator[pa.Table]:
    """Yield the manifest as tables of string columns `id` and `uri`, a batch at a time, never all at once.

    `spec` is a manifest file, a folder or glob of manifest files, a folder or glob of image files, or WebDataset
    tars (a folder, a glob, or a brace range such as shards/{00000..00099}.tar: one table per tar, with a
    `member` column). `columns` names the id, uri and image-bytes columns (then a binary `bytes` column comes too, and a
    missing uri is `<manifest>#<row>`). A missing `id` is the uri itself; an image's id is its path relative to the
    folder (or the glob's fixed part), so moving the mount does not change ids. Relative local uris are resolved
    against the manifest's folder.
    """
    yield from _tables(_expand(spec, storage_options or {}), columns, digest=False)


def _tables(inputs: _Inputs, columns: Columns, digest: bool) -> Iterator[pa.Table]:
    if inputs.kind == "images":
        yield from _image_tables(inputs)
        return
    if inputs.kind == "tars":
        yield from (tars.index_table(inputs.fs, path, digest) for path in inputs.files)
        return
    for path in inputs.files:
        row = 0
        for t in read_batches(inputs.fs, path, BATCH_ROWS, JSON_BLOCK_BYTES, columns):
            if "uri" in t.column_names:
                uris = resolve_uris(inputs.fs, path, t.column("uri"))
            else:  # images inside the manifest, which names no uri: where the row is
                url = path if "file" in inputs.fs.protocol else inputs.fs.unstrip_protocol(path)
                uris = pa.array([f"{url}#{r}" for r in range(row, row + t.num_rows)], pa.string())
            ids = t.column("id") if "id" in t.column_names else uris
            if ("uri" in t.column_names and _has_empty(t.column("uri"))) or _has_empty(ids):
                raise ManifestError(f"manifest {path} has empty '{columns.uri}' or '{columns.id}' values")
            row += t.num_rows
            yield pa.table({"id": ids, "uri": uris, **({"bytes": t.column("bytes")} if columns.bytes else {})})


def _has_empty(column: pa.ChunkedArray) -> bool:
    import pyarrow.compute as pc

    return bool(column.null_count) or (len(column) > 0 and pc.min(pc.binary_length(column)).as_py() == 0)


def _image_tables(inputs: _Inputs) -> Iterator[pa.Table]:
    local = "file" in inputs.fs.protocol
    for i in range(0, len(inputs.files), BATCH_ROWS):
        files = inputs.files[i:i + BATCH_ROWS]
        uris = [file_uri(f) if local else inputs.fs.unstrip_protocol(f) for f in files]
        ids = [relative_id(f, inputs.base) for f in files]
        yield pa.table({"id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())})


@dataclass(frozen=True)
class ManifestScan:
    rows: int
    fingerprint: str  # of the (id, uri) values and the images' content when the input holds them
    groups: tuple[int, ...] = ()  # rows per tar (WebDataset input): no shard crosses a tar

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
    inputs = _expand(spec, storage_options or {})
    h_id, h_uri, h_content = ColumnHash(), ColumnHash(), ColumnHash()
    rows, hashes, groups = 0, [], []
    for t in _tables(inputs, columns, digest=True):
        rows += t.num_rows
        groups.append(t.num_rows)
        h_id.update(t.column("id"))
        h_uri.update(t.column("uri"))
        for content in ("bytes", "sha256"):  # a changed image changes the fingerprint, so a rerun recomputes it
            if content in t.column_names:
                h_content.update(t.column(content))
        hashes.append(np.fromiter((hash(i) for i in t.column("id").to_pylist()), dtype=np.int64, count=t.num_rows))
    if rows == 0:
        raise ManifestError(f"manifest {spec} is empty: no rows to process")
    hashes = np.concatenate(hashes)
    _check_duplicates(spec, hashes, lambda: _tables(inputs, Columns(columns.id, columns.uri), False))
    content = h_content.digest() if columns.bytes or inputs.kind == "tars" else b""
    fingerprint = hashlib.sha256(h_id.digest() + h_uri.digest() + content).hexdigest()[:16]
    return ManifestScan(rows, fingerprint, tuple(groups) if inputs.kind == "tars" else ())


def _check_duplicates(spec: str, hashes: np.ndarray, tables: Callable[[], Iterator[pa.Table]]) -> None:
    hashes.sort()  # in place: 8 bytes a row, plus a bit per row for the comparison
    repeated = hashes[1:] == hashes[:-1]
    if repeated.any():  # 64-bit hashes can collide: confirm on the few suspects, exactly
        suspects, seen, dups = set(hashes[1:][repeated].tolist()), set(), {}
        for t in tables():
            for i in t.column("id").to_pylist():
                if hash(i) in suspects:
                    if i in seen:
                        dups[i] = True
                    seen.add(i)
        if dups:
            names = ", ".join(repr(v) for v in list(dups)[:5])
            raise ManifestError(f"manifest {spec} has {len(dups)} duplicate ids (e.g. {names}); ids must be unique")


def read_manifest(spec: str, storage_options: dict | None = None, columns: Columns = Columns()) -> pa.Table:
    """The whole manifest as one (id, uri) table, after scan_manifest's checks (for callers that need it all)."""
    scan_manifest(spec, storage_options, columns)
    return pa.concat_tables(iter_manifest(spec, storage_options, columns))


def write_plan(spec: str, storage_options: dict | None, shard_size: int, shards: list[Shard],
               write: Callable[[Shard, pa.Table], None], columns: Columns = Columns()) -> None:
    """Stream the manifest again and hand each shard in `shards` its rows [start, stop) (shard_size is implied by
    the shards); reading stops after the last one."""
    todo, k, row, parts = sorted(shards, key=lambda s: s.start), 0, 0, []
    for t in iter_manifest(spec, storage_options, columns):
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
