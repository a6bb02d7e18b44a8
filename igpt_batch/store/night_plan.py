"""A night's plan (NightPlan): stat the manifest by listings, join it with the current table per hash bucket of id,
decide every row.

With more than refresh.plan_bucket_rows rows a night is planned in two rounds of n tasks, so no process holds more
than a bucket: the manifest is split by hash of each row's folder or prefix (so each is listed once in the night),
and those tasks write their stats grouped by hash bucket of id; the decide tasks join them with the current table's
metadata columns, split by the same hash of id."""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.config import JobConfig
from igpt_batch.inputs.manifest_files import Columns
from igpt_batch.inputs.stat import STAT_SCHEMA, is_web, prefix_of, stat_table
from igpt_batch.store.decide import Bucket, Counts, as_mask, decide
from igpt_batch.store.layout import SOURCE, Store, current_schema

META = (*(name for name, _ in SOURCE), "deleted")  # the current table's columns planning reads
# a manifest row as planning reads it: `row` its position; `sha256` the content of an image inside the manifest (a
# bytes column, a tar member: hashed while planning, never held), null for a uri to stat; `member` a tar member
PLANNED = pa.schema([("id", pa.string()), ("uri", pa.string()), ("row", pa.int64()), ("sha256", pa.string()),
                     ("member", pa.string())])
STATED = pa.schema([*PLANNED, *STAT_SCHEMA, ("bucket", pa.int64())])  # stat files


@dataclass
class NightPlan:
    """A night's decision for every manifest row, from its buckets."""

    compute: pa.Table  # PLANNED and STAT_SCHEMA columns of the rows to embed, in manifest order (uris unredacted)
    buckets: list[Bucket]
    stat: Counter = field(default_factory=Counter)  # lists and heads made by the stat round (inputs.stat)

    @cached_property
    def counts(self) -> Counts:
        return sum((b.counts for b in self.buckets), Counts())

    @cached_property
    def touch(self) -> pa.Table:
        return pa.concat_tables([b.touch for b in self.buckets])

    @cached_property
    def gone(self) -> pa.Table:
        return pa.concat_tables([b.gone for b in self.buckets])

    @cached_property
    def failed(self) -> pa.Table:
        return pa.concat_tables([b.failed for b in self.buckets])

    @cached_property
    def newly_deleted(self) -> int:
        """Rows gone tonight that were live (not marked deleted on an earlier night)."""
        return int((~as_mask(self.gone.column("deleted"))).sum())


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


def plan_night(cfg: JobConfig, store: Store, version: str, failed: pa.Table, pending: str | None) -> NightPlan:
    """Decide every manifest row. Up to refresh.plan_bucket_rows rows are planned here; more in two rounds of
    bucket tasks (Ray tasks with the ray executor; see the module's docstring), through the planning folder, which
    holds fetchable uris and is removed when planning ends, whether it succeeded or not."""
    from igpt_batch.inputs.manifest import scan_manifest

    rows = scan_manifest(cfg.input.manifest, cfg.storage_options, Columns.of(cfg.input)).rows  # empty, duplicate ids
    n = max(1, -(-rows // cfg.refresh.plan_bucket_rows))
    if n == 1:
        prev = store.read(version, columns=list(META))
        prev = prev if prev.num_rows or prev.num_columns else _empty_meta()
        man = pa.concat_tables(manifest_rows(cfg))
        st, io = stat_rows(man, cfg)
        man = pa.table({**{c: man.column(c) for c in man.column_names}, **{c: st.column(c) for c in st.column_names}})
        bucket, compute = decide(man, prev, failed, cfg, pending)
        return NightPlan(compute, [bucket], io)
    planning = store.planning(version, cfg.refresh.planning_folder)
    planning.remove("")
    try:
        _split(cfg, store, version, n)
        where = (cfg, store.url, store.storage_options, version, n)
        io = sum(_run(cfg, stat_bucket, [(*where, b) for b in range(n)]), Counter())
        buckets = _run(cfg, decide_bucket, [(*where, b, failed, pending) for b in range(n)])
        compute = pa.concat_tables([planning.read_table(store.bucket_file("compute", b)) for b in range(n)])
    finally:
        planning.remove("")
    return NightPlan(compute.sort_by("row"), buckets, io)


def manifest_rows(cfg: JobConfig) -> Iterator[pa.Table]:
    """The user's manifest (its id, uri, bytes and member columns as configured) as PLANNED tables, a batch at a
    time: images inside the manifest are hashed here, and their bytes dropped."""
    from igpt_batch.inputs.manifest import iter_manifest

    row = 0
    for t in iter_manifest(cfg.input.manifest, cfg.storage_options, Columns.of(cfg.input), digest=True):
        n, cols = t.num_rows, t.column_names
        if "bytes" in cols:
            sha = pa.array([None if b is None else hashlib.sha256(b).hexdigest() for b in t.column("bytes").to_pylist()],
                           pa.string())
        else:
            sha = t.column("sha256") if "sha256" in cols else pa.nulls(n, pa.string())
        yield pa.table({"id": t.column("id"), "uri": t.column("uri"), "row": pa.array(np.arange(row, row + n)),
                        "sha256": sha, "member": t.column("member") if "member" in cols else pa.nulls(n, pa.string())},
                       schema=PLANNED)
        row += n


def stat_rows(t: pa.Table, cfg: JobConfig) -> tuple[pa.Table, Counter]:
    """stat_table of the rows whose content is not known already (null sha256); the others get null stats."""
    need = as_mask(pc.is_null(t.column("sha256")))
    if need.all():
        return stat_table(t.column("uri").combine_chunks(), cfg.storage_options, cfg.input.read_timeout)
    st, io = stat_table(t.column("uri").filter(pa.array(need)).combine_chunks(), cfg.storage_options,
                        cfg.input.read_timeout)
    at = pa.array(np.cumsum(need) - 1, mask=~need)
    return st.take(at), io


def _run(cfg: JobConfig, fn, args: list[tuple]) -> list:
    """fn(*a) for every a: as Ray tasks with the ray executor, else one after another here."""
    if cfg.run.executor != "ray":
        out = []
        for a in args:
            out.append(fn(*a))
            pa.default_memory_pool().release_unused()  # a bucket's pages, before the next bucket's
        return out
    import ray

    from igpt_batch.run.cluster import init_ray

    init_ray(cfg.run.address)
    task = ray.remote(num_cpus=1, max_retries=cfg.run.max_retries)(fn)
    return ray.get([task.remote(*a) for a in args])


def _empty_meta() -> pa.Table:
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

    planning = store.planning(version, cfg.refresh.planning_folder)
    planning.fs.makedirs(planning.path(""), exist_ok=True)
    ds = store.open(version)
    manifest = manifest_rows(cfg)
    sources = {"manifest": (manifest, lambda t: _stat_bucket_of(t, n)),
               "current": ((pa.Table.from_batches([b]) for b in ds.to_batches(columns=list(META), batch_size=65536,
                                                                                 fragment_readahead=1, batch_readahead=1))
                           if ds is not None else iter([_empty_meta()]), lambda t: bucket_of(t.column("id"), n))}
    for kind, (tables, bucket) in sources.items():
        writers = {}
        for t in tables:
            for b, part in _by_bucket(t, bucket(t), n):
                if b not in writers:
                    sink = planning.fs.open(planning.path(store.bucket_file(kind, b)), "wb")
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

    store = Store(url, storage_options)
    planning, io = store.planning(version, cfg.refresh.planning_folder), Counter()
    with planning.fs.open(planning.path(store.bucket_file("stat", b)), "wb") as sink, \
            pq.ParquetWriter(sink, STATED) as writer, planning.fs.open(planning.path(store.bucket_file("manifest", b))) as f:
        # twice a bucket's rows at a time: a stat bucket holds plan_bucket_rows on average, so nearly all are stat-ed
        # in one slice (every folder listed once), and the stat columns are a fraction of a decide bucket's
        for batch in pq.ParquetFile(f).iter_batches(batch_size=2 * cfg.refresh.plan_bucket_rows):
            st, c = stat_rows(pa.Table.from_batches([batch]), cfg)
            io.update(c)
            bucket = bucket_of(batch.column("id"), n)
            t = pa.table({**{k: batch.column(k) for k in PLANNED.names}, **{k: st.column(k) for k in st.column_names},
                          "bucket": bucket}, schema=STATED)
            for _, part in _by_bucket(t, bucket, n):
                if part.num_rows:
                    writer.write_table(part)
    return io


def decide_bucket(cfg, url, storage_options, version, n, b, failed, pending) -> Bucket:
    """decide() for id bucket b, from its rows in every stat file; its rows to compute go to the file
    compute-b in the planning folder, not back to the driver."""
    import pyarrow.dataset as pads

    store = Store(url, storage_options)
    planning = store.planning(version, cfg.refresh.planning_folder)
    stats = pads.dataset([planning.path(store.bucket_file("stat", s)) for s in range(n)], schema=STATED,
                         format="parquet", filesystem=planning.fs)
    man = stats.to_table(filter=pc.field("bucket") == b).drop_columns(["bucket"])
    bucket, compute = decide(man, planning.read_table(store.bucket_file("current", b)), failed, cfg, pending)
    planning.write_table(store.bucket_file("compute", b), compute)
    return bucket
