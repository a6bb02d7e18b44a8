"""Refresh planning: stat the manifest by listings, join it with the current table per hash bucket of id, decide.

With more than refresh.plan_bucket_rows rows a night is planned in two rounds of n tasks, so no process holds more
than a bucket: the manifest is split by hash of each row's folder or prefix (so each is listed once in the night),
and those tasks write their stats grouped by hash bucket of id; the decide tasks join them with the current table's
metadata columns, split by the same hash of id."""
from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch import errors
from igpt_batch.config import JobConfig
from igpt_batch.inputs import fetch
from igpt_batch.inputs.stat import STAT_SCHEMA, THREADS, is_web, prefix_of, stat_table

BUCKET_ROWS = 250_000  # default refresh.plan_bucket_rows: manifest rows planned by one process
META = ("id", "uri", "sha256", "size", "mtime", "etag", "deleted")  # the current table's columns planning reads
STATED = pa.schema([("id", pa.string()), ("uri", pa.string()), *STAT_SCHEMA, ("bucket", pa.int64())])  # stat files
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


def sha_of(uri: str, cfg: JobConfig) -> str | None:
    try:
        data = fetch.read_bytes(uri, cfg.storage_options, timeout=cfg.input.read_timeout, max_bytes=cfg.input.max_bytes)
    except errors.ImageError:
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
    """One bucket of a night: its manifest rows, already stat-ed (id, uri, size, mtime, etag: before any bytes
    are read), decided against the previous row of each id. Returns the rows to compute, the metadata updates,
    the ids gone and the counts."""
    ids, uris = man.column("id").combine_chunks(), man.column("uri").combine_chunks()
    st = man.select(STAT_SCHEMA.names)
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
              "previous_deleted": int(as_mask(prev.column("deleted")).sum()), **{f"pre_{k}": v for k, v in pre.items()}}
    return {"compute": stat.filter(pa.array(compute)), "touch": stat.filter(pa.array(unchanged & moved)),
            "gone": gone, "failed": failed.filter(pc.is_in(failed.column("id"), value_set=ids)), "counts": counts}


def plan_night(cfg: JobConfig, store, version: str, failed: pa.Table, pending: str | None) -> dict:
    """Decide every manifest row. Up to refresh.plan_bucket_rows rows are planned here; more in two rounds of
    bucket tasks (Ray tasks with the ray executor; see the module's docstring)."""
    from igpt_batch.inputs.manifest import iter_manifest, scan_manifest

    rows = scan_manifest(cfg.input.manifest, cfg.storage_options).rows  # the checks: empty, duplicate ids
    per = getattr(cfg.refresh, "plan_bucket_rows", BUCKET_ROWS)
    n = max(1, -(-rows // per))
    if n == 1:
        prev = store.read(version, columns=list(META))
        prev = prev if prev.num_rows or prev.num_columns else _empty_meta()
        man = pa.concat_tables(iter_manifest(cfg.input.manifest, cfg.storage_options))
        st, io = stat_table(man.column("uri").combine_chunks(), cfg.storage_options, cfg.input.read_timeout)
        man = pa.table({"id": man.column("id"), "uri": man.column("uri"), **{c: st.column(c) for c in st.column_names}})
        return combine([decide(man, prev, failed, cfg, pending)], [io])
    scratch = store.scratch(version)
    scratch.remove("")
    _split(cfg, store, version, n)
    where = (cfg, store.url, store.storage_options, version, n)
    io = _run(cfg, stat_bucket, [(*where, b) for b in range(n)])
    return combine(_run(cfg, decide_bucket, [(*where, b, failed, pending) for b in range(n)]), io)


def _run(cfg: JobConfig, fn, args: list[tuple]) -> list:
    """fn(*a) for every a: as Ray tasks with the ray executor, else one after another here."""
    if cfg.run.executor != "ray":
        out = []
        for a in args:
            out.append(fn(*a))
            pa.default_memory_pool().release_unused()  # a bucket's pages, before the next bucket's
        return out
    import ray

    from igpt_batch.run.executors import init_ray

    init_ray(cfg.run.address)
    task = ray.remote(num_cpus=1, max_retries=cfg.run.max_retries)(fn)
    return ray.get([task.remote(*a) for a in args])


def _empty_meta() -> pa.Table:
    from igpt_batch.store.layout import current_schema

    return current_schema(1).empty_table().select(list(META))


def _by_bucket(t: pa.Table, bucket: np.ndarray, n: int) -> Iterator[tuple[int, pa.Table]]:
    """(b, t's rows in bucket b) for every b in 0..n-1 (empty ones too), with one sort instead of n filters."""
    order = np.argsort(bucket, kind="stable")
    t, bounds = t.take(order), np.searchsorted(bucket[order], np.arange(n + 1))
    for b in range(n):
        yield b, t.slice(bounds[b], bounds[b + 1] - bounds[b])


def _stat_bucket_of(t: pa.Table, n: int) -> np.ndarray:
    """A manifest row's stat bucket: the hash of its folder or prefix, so each is listed by one task; by id for
    http(s) rows, which are never listed."""
    uris = t.column("uri")
    return np.where(as_mask(is_web(uris)), bucket_of(t.column("id"), n), bucket_of(prefix_of(uris), n))


def _split(cfg: JobConfig, store, version: str, n: int) -> None:
    """Stream the manifest into n stat bucket files and the current table's metadata columns into n id bucket files."""
    import pyarrow.parquet as pq

    from igpt_batch.inputs.manifest import iter_manifest

    scratch = store.scratch(version)
    scratch.fs.makedirs(scratch.path(""), exist_ok=True)
    ds = store.open(version)
    ids = pa.schema([STATED.field("id"), STATED.field("uri")])
    manifest = (t.select(ids.names).cast(ids) for t in iter_manifest(cfg.input.manifest, cfg.storage_options))
    sources = {"manifest": (manifest, lambda t: _stat_bucket_of(t, n)),
               "current": ((pa.Table.from_batches([b]) for b in ds.to_batches(columns=list(META), batch_size=65536,
                                                                                 fragment_readahead=1, batch_readahead=1))
                           if ds is not None else iter([_empty_meta()]), lambda t: bucket_of(t.column("id"), n))}
    for kind, (tables, bucket) in sources.items():
        writers = {}
        for t in tables:
            for b, part in _by_bucket(t, bucket(t), n):
                if b not in writers:
                    sink = scratch.fs.open(scratch.path(store.bucket_file(kind, b)), "wb")
                    writers[b] = (sink, pq.ParquetWriter(sink, part.schema))
                writers[b][1].write_table(part)
            del t, part
            pa.default_memory_pool().release_unused()  # else the allocator keeps every batch's pages: RSS grows with N
        for sink, w in writers.values():
            w.close()
            sink.close()


def stat_bucket(cfg, url, storage_options, version, n, b) -> Counter:
    """Stat stat bucket b's manifest rows, 2 * plan_bucket_rows at a time, and write them to stat-b grouped by hash
    bucket of id (a row group or more per id bucket). Returns the lists and HEADs made."""
    import pyarrow.parquet as pq

    from igpt_batch.store.layout import Store

    store = Store(url, storage_options)
    scratch, io = store.scratch(version), Counter()
    with scratch.fs.open(scratch.path(store.bucket_file("stat", b)), "wb") as sink, \
            pq.ParquetWriter(sink, STATED) as writer, scratch.fs.open(scratch.path(store.bucket_file("manifest", b))) as f:
        # twice a bucket's rows at a time: a stat bucket holds plan_bucket_rows on average, so nearly all are stat-ed
        # in one slice (every folder listed once), and the stat columns are a fraction of a decide bucket's
        for batch in pq.ParquetFile(f).iter_batches(batch_size=2 * getattr(cfg.refresh, "plan_bucket_rows", BUCKET_ROWS)):
            st, c = stat_table(batch.column("uri"), cfg.storage_options, cfg.input.read_timeout)
            io.update(c)
            bucket = bucket_of(batch.column("id"), n)
            t = pa.table({"id": batch.column("id"), "uri": batch.column("uri"), **{k: st.column(k) for k in st.column_names},
                          "bucket": bucket}, schema=STATED)
            for _, part in _by_bucket(t, bucket, n):
                if part.num_rows:
                    writer.write_table(part)
    return io


def decide_bucket(cfg, url, storage_options, version, n, b, failed, pending) -> dict:
    """decide() for id bucket b, from its rows in every stat file; its rows to compute go to a file beside the
    bucket's, not back to the driver."""
    import pyarrow.dataset as pads

    from igpt_batch.store.layout import Store, write_parquet

    store = Store(url, storage_options)
    scratch = store.scratch(version)
    stats = pads.dataset([scratch.path(store.bucket_file("stat", s)) for s in range(n)], schema=STATED,
                         format="parquet", filesystem=scratch.fs)
    man = stats.to_table(filter=pc.field("bucket") == b).drop_columns(["bucket"])
    out = decide(man, scratch.read_table(store.bucket_file("current", b)), failed, cfg, pending)
    write_parquet(scratch, store.bucket_file("compute", b), out.pop("compute"))
    return out | {"compute": store.bucket_file("compute", b)}


def combine(results: list[dict], io: list[Counter]) -> dict:
    """The night's plan from its buckets: counts summed (with the lists and HEADs made), the small tables
    concatenated, the compute parts listed."""
    counts = Counter()
    for c in [r["counts"] for r in results] + [{f"stat_{k}": v for k, v in i.items()} for i in io]:
        counts.update(c)
    cat = {k: pa.concat_tables([r[k] for r in results]) for k in ("touch", "gone", "failed")}
    return {"counts": dict(counts), "compute": [r["compute"] for r in results], **cat}
