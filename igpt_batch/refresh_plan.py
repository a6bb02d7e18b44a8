"""Refresh planning: stat the manifest by listings, join it with the current table per hash bucket of id, decide."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath
import urllib.parse
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import images
from .config import JobConfig

THREADS = 16  # concurrent HEADs, listings and re-reads
LIST_MIN = 4  # a prefix holding at least this many of a bucket's rows is listed once instead of stat-ed row by row
BUCKET_ROWS = 250_000  # default refresh.plan_bucket_rows: manifest rows planned by one process
META = ("id", "uri", "sha256", "size", "mtime", "etag", "deleted")  # the current table's columns planning reads
STAT_SCHEMA = pa.schema([("size", pa.int64()), ("mtime", pa.string()), ("etag", pa.string())])
TOUCH = ("id", "uri", "size", "mtime", "etag")  # a metadata update: these columns of an unchanged row


def bucket_of(ids: pa.Array, n: int) -> np.ndarray:
    """A hash of each id's UTF-8 bytes, mod n, vectorised (it only has to agree with itself within one night)."""
    ids = pc.cast(ids, pa.large_string()).combine_chunks() if isinstance(ids, pa.ChunkedArray) else pc.cast(ids, pa.large_string())
    if n == 1 or not len(ids):
        return np.zeros(len(ids), np.int64)
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset: ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], np.uint8)[offsets[0]: offsets[-1]].astype(np.uint64)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    pos = (np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = (data + np.uint64(1)) * (pos * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1))
        h = np.zeros(len(ids), np.uint64)
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(mixed, starts[nonempty]) if len(data) else 0
        h ^= lengths.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser spreads the sum
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h % np.uint64(n)).astype(np.int64)


def _local_path(uri: str) -> str | None:
    """The filesystem path of a local uri (as images.read_bytes: file:// URLs are percent-encoded), else None."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if not scheme:
        return uri
    if scheme in ("file", "local"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri.split("://", 1)[1]))
    return None


def _from_info(info: dict) -> dict:
    """{size, mtime, etag} from an fsspec info or listing entry (the same values either way)."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    etag = info.get("ETag") or info.get("etag")
    return {"size": info.get("size"), "mtime": mtime.isoformat() if isinstance(mtime, dt.datetime) else
            (None if mtime is None else str(mtime)), "etag": None if etag is None else str(etag).strip('"')}


def _fs_for(uri: str, options: dict):
    if uri.split("://", 1)[0].lower() in ("http", "https"):  # as images.read_bytes: only headers apply to http(s)
        kw = {"client_kwargs": {"headers": options["headers"]}} if options.get("headers") else {}
        return fsspec.filesystem("http", **kw), uri
    return fsspec.core.url_to_fs(uri, **options)


def stat_one(uri: str, options: dict, timeout: float) -> dict | None:
    """{size, mtime, etag} of one source without reading its bytes (a HEAD); None when the store cannot say."""
    try:
        path = _local_path(uri)
        if path is not None:
            st = os.stat(path)
            return {"size": st.st_size, "mtime": str(st.st_mtime_ns), "etag": None}
        fs, path = _fs_for(uri, options)
        fs.invalidate_cache(path)  # object stores cache listings; tonight's answer must be fresh
        return _from_info(images._with_deadline(lambda: fs.info(path), timeout, uri))
    except Exception:  # missing, denied, timed out: decided by reading (and the worker records the error)
        return None


def _listing(prefix: str, wanted: set[str], options: dict, timeout: float) -> dict[str, dict]:
    """Basename -> stat of the `wanted` entries of one folder or prefix: os.scandir locally, one LIST on object
    stores. Only wanted entries are kept, so memory follows the bucket's rows, not the folder's size."""
    try:
        path = _local_path(prefix)
        if path is not None:
            with os.scandir(path or ".") as it:
                return {e.name: _entry_stat(e) for e in it if e.name in wanted}
        fs, path = _fs_for(prefix, options)
        fs.invalidate_cache(path)
        found = images._with_deadline(lambda: fs.ls(path, detail=True), timeout, prefix)
        return {name: _from_info(i) for i in found
                if i.get("type") != "directory" and (name := posixpath.basename(i["name"].rstrip("/"))) in wanted}
    except Exception:
        return {}


def _entry_stat(entry: os.DirEntry) -> dict | None:
    try:
        st = entry.stat()
        return {"size": st.st_size, "mtime": str(st.st_mtime_ns), "etag": None}
    except OSError:
        return None


def _basename(uri: str) -> str:
    path = _local_path(uri)
    return os.path.basename(path) if path is not None else uri.rsplit("/", 1)[-1]


def stat_table(uris: pa.Array, options: dict, timeout: float) -> tuple[pa.Table, Counter]:
    """size, mtime, etag of every uri (nulls where the store cannot say): prefixes shared by LIST_MIN rows or more
    are listed once, the other rows are stat-ed one by one (http(s) always). Also counts lists and HEADs."""
    uris = uris.to_pylist()
    by_prefix = defaultdict(list)
    for i, u in enumerate(uris):
        web = u.lower().startswith(("http://", "https://"))
        by_prefix[None if web else (u.rsplit("/", 1)[0] if "/" in u else "")].append(i)
    listed = [p for p, rows in by_prefix.items() if p is not None and len(rows) >= LIST_MIN]
    head = [i for p, rows in by_prefix.items() if p not in listed for i in rows]
    cols = {c: [None] * len(uris) for c in STAT_SCHEMA.names}

    def put(i: int, st: dict | None) -> None:
        for c in cols:
            cols[c][i] = (st or {}).get(c)

    with ThreadPoolExecutor(THREADS, thread_name_prefix="igpt-refresh") as pool:
        wanted = [{_basename(uris[i]) for i in by_prefix[p]} for p in listed]
        for p, entries in zip(listed, pool.map(lambda pw: _listing(pw[0], pw[1], options, timeout), zip(listed, wanted))):
            for i in by_prefix[p]:
                put(i, entries.get(_basename(uris[i])))
        for i, st in zip(head, pool.map(lambda i: stat_one(uris[i], options, timeout), head)):
            put(i, st)
    return pa.table(cols, schema=STAT_SCHEMA), Counter(lists=len(listed), heads=len(head))


def sha_of(uri: str, cfg: JobConfig) -> str | None:
    try:
        data = images.read_bytes(uri, cfg.storage_options, timeout=cfg.input.read_timeout, max_bytes=cfg.input.max_bytes)
    except images.ImageError:
        return None
    return hashlib.sha256(data).hexdigest()


def _threads(fn, items: list) -> Iterator:
    with ThreadPoolExecutor(THREADS, thread_name_prefix="igpt-refresh") as pool:
        yield from pool.map(fn, items)


def differs(a: pa.Array, b: pa.Array) -> np.ndarray:
    """a != b elementwise, where null equals only null (as Python's None)."""
    ne = pc.fill_null(pc.not_equal(a, b), False)
    return as_mask(pc.or_(ne, pc.xor(pc.is_null(a), pc.is_null(b))))


def as_mask(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow boolean column as a numpy mask, null read as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def same_source(uri: pa.Array, st: pa.Table, was: pa.Table, nulls_equal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(by_etag, by_size_mtime): rows whose metadata says the bytes are those recorded in `was` (when both sides
    have an ETag, it alone decides). With nulls_equal, a source that could not be stat-ed then or now is the same."""
    eq = (lambda a, b: ~differs(a, b)) if nulls_equal else (lambda a, b: as_mask(pc.equal(a, b)))
    same_uri = as_mask(pc.equal(uri, was.column("uri")))
    both_etag = as_mask(pc.not_equal(was.column("etag"), "")) & as_mask(pc.not_equal(st.column("etag"), ""))
    by_etag = same_uri & both_etag & eq(was.column("etag"), st.column("etag"))
    by_size_mtime = same_uri & ~both_etag & eq(was.column("size"), st.column("size")) & eq(was.column("mtime"), st.column("mtime"))
    return by_etag, by_size_mtime


def decide(man: pa.Table, prev: pa.Table, failed: pa.Table, cfg: JobConfig, pending: str | None) -> dict:
    """One bucket of a night: every manifest row stat-ed (before any bytes are read), then decided against the
    previous row of its id. Returns the rows to compute, the metadata updates, the ids gone and the counts."""
    ids, uris = man.column("id").combine_chunks(), man.column("uri").combine_chunks()
    st, io = stat_table(uris, cfg.storage_options, cfg.input.read_timeout)
    at = pc.index_in(ids, value_set=prev.column("id"))  # row in prev, null for a new id
    was = prev.select(["uri", *STAT_SCHEMA.names, "deleted"]).take(at)
    known = as_mask(pc.is_valid(at))
    by_etag, by_size_mtime = (known & m for m in same_source(uris, st, was))
    to_hash = np.flatnonzero(known & ~by_etag & ~by_size_mtime)
    shas = list(_threads(lambda u: sha_of(u, cfg), uris.take(to_hash).to_pylist()))
    old = prev.column("sha256").take(at.take(to_hash)).to_pylist()
    same_bytes = np.array([sha is not None and sha == o for sha, o in zip(shas, old)], dtype=bool)
    unchanged = by_etag | by_size_mtime
    unchanged[to_hash[same_bytes]] = True
    changed = np.zeros(len(ids), dtype=bool)
    changed[to_hash[~same_bytes]] = True  # different bytes, or unreadable now (the extract run records why)
    # a row that failed before and whose source has not changed since is not retried (unless --retry-errors);
    # one that failed in the night being resumed is, as that night's first attempt did
    fat = pc.index_in(ids, value_set=failed.column("id"))
    fwas = failed.select(["uri", *STAT_SCHEMA.names, "last_night"]).take(fat)
    f_etag, f_size_mtime = same_source(uris, st, fwas, nulls_equal=True)
    skip = as_mask(pc.is_valid(fat)) & (f_etag | f_size_mtime) & ~unchanged \
        & as_mask(pc.not_equal(fwas.column("last_night"), pending or "")) & (not getattr(cfg.refresh, "retry_errors", False))
    moved = as_mask(was.column("deleted")) | differs(uris, was.column("uri"))
    for c in STAT_SCHEMA.names:
        moved |= differs(st.column(c), was.column(c))
    compute = (~known | changed) & ~skip
    stat = pa.table({"id": ids, "uri": uris, **{c: st.column(c) for c in STAT_SCHEMA.names}})
    gone = prev.filter(pc.invert(pc.is_in(prev.column("id"), value_set=ids))).select(["id", "deleted"])
    pre = {"etag": int(by_etag.sum()), "size_mtime": int(by_size_mtime.sum()), "hashed": len(to_hash),
           "hash_unchanged": int(same_bytes.sum())}
    counts = {"manifest_rows": len(ids), "new": int((~known & ~skip).sum()), "changed": int((changed & ~skip).sum()),
              "unchanged": int(unchanged.sum()), "revived": int((unchanged & as_mask(was.column("deleted"))).sum()),
              "failed_unchanged": int(skip.sum()), "previous_rows": prev.num_rows,
              "previous_deleted": int(as_mask(prev.column("deleted")).sum()), **{f"pre_{k}": v for k, v in pre.items()},
              **{f"stat_{k}": v for k, v in io.items()}}
    return {"compute": stat.filter(pa.array(compute)), "touch": stat.filter(pa.array(unchanged & moved)),
            "gone": gone, "failed": failed.filter(pc.is_in(failed.column("id"), value_set=ids)), "counts": counts}


def plan_night(cfg: JobConfig, store, version: str, failed: pa.Table, pending: str | None) -> dict:
    """Decide every manifest row. Up to refresh.plan_bucket_rows rows are planned here; more are split into hash
    buckets of id (the manifest and the current table's metadata columns, streamed) and planned one bucket per
    task (Ray tasks with the ray executor), so no process holds more than a bucket."""
    from .manifest import iter_manifest, scan_manifest

    rows = scan_manifest(cfg.input.manifest, cfg.storage_options).rows  # the checks: empty, duplicate ids
    n = max(1, -(-rows // getattr(cfg.refresh, "plan_bucket_rows", BUCKET_ROWS)))
    if n == 1:
        prev = store.read(version, columns=list(META))
        prev = prev if prev.num_rows or prev.num_columns else _empty_meta()
        return combine([decide(pa.concat_tables(iter_manifest(cfg.input.manifest, cfg.storage_options)), prev,
                               failed, cfg, pending)])
    scratch = store.scratch(version)
    scratch.remove("")
    _split(cfg, store, version, n)
    args = [(cfg, store.url, store.storage_options, version, b, failed, pending) for b in range(n)]
    if cfg.run.executor == "ray":
        import ray

        from .executors import init_ray

        init_ray(cfg.run.address)
        task = ray.remote(num_cpus=1, max_retries=cfg.run.max_retries)(decide_bucket)
        results = ray.get([task.remote(*a) for a in args])
    else:
        results = [decide_bucket(*a) for a in args]
    return combine(results)


def _empty_meta() -> pa.Table:
    from .store import current_schema

    return current_schema(1).empty_table().select(list(META))


def _split(cfg: JobConfig, store, version: str, n: int) -> None:
    """Stream the manifest and the current table's metadata columns into n bucket files each."""
    import pyarrow.parquet as pq

    from .manifest import iter_manifest

    scratch = store.scratch(version)
    scratch.fs.makedirs(scratch.path(""), exist_ok=True)
    ds = store.open(version)
    sources = {"manifest": iter_manifest(cfg.input.manifest, cfg.storage_options),
               "current": (pa.Table.from_batches([b]) for b in ds.to_batches(columns=list(META), batch_size=65536))
               if ds is not None else iter([_empty_meta()])}
    for kind, batches in sources.items():
        writers = {}
        for t in batches:
            bucket = bucket_of(t.column("id"), n)
            for b in range(n):
                part = t.filter(pa.array(bucket == b))
                if b not in writers:
                    sink = scratch.fs.open(scratch.path(store.bucket_file(kind, b)), "wb")
                    writers[b] = (sink, pq.ParquetWriter(sink, part.schema))
                writers[b][1].write_table(part)
        for sink, w in writers.values():
            w.close()
            sink.close()


def decide_bucket(cfg, url, storage_options, version, b, failed, pending) -> dict:
    """decide() for bucket b; its rows to compute go to a file beside the bucket's, not back to the driver."""
    from .store import Store, write_parquet

    store = Store(url, storage_options)
    scratch = store.scratch(version)
    out = decide(scratch.read_table(store.bucket_file("manifest", b)), scratch.read_table(store.bucket_file("current", b)),
                 failed, cfg, pending)
    write_parquet(scratch, store.bucket_file("compute", b), out.pop("compute"))
    return out | {"compute": store.bucket_file("compute", b)}


def combine(results: list[dict]) -> dict:
    """The night's plan from its buckets: counts summed, the small tables concatenated, the compute parts listed."""
    counts = Counter()
    for r in results:
        counts.update(r["counts"])
    cat = {k: pa.concat_tables([r[k] for r in results]) for k in ("touch", "gone", "failed")}
    return {"counts": dict(counts), "compute": [r["compute"] for r in results], **cat}
