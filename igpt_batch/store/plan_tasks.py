"""The tasks of a big night's plan (store/night_plan.py runs them): a hash shuffle through the planning folder.

1. split: one task per manifest unit (inputs/units.py) or range of the current table's Lance fragments writes its rows
   into per-bucket part files (`manifest/bucket=B/`: by folder or prefix; `current/bucket=B/`: by id), each written
   whole in one put, and returns its rows per bucket;
2. stat: task B stats `manifest/bucket=B/` and writes it into `stat/bucket=I/` by id bucket I;
3. decide: task B checks its ids (empty, duplicates) and decides `stat/bucket=B/` against `current/bucket=B/`.
A task opens only the files of its own unit or bucket; the driver holds counts."""
from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.config import JobConfig
from igpt_batch.errors import JobError, UsageError
from igpt_batch.inputs.listing import Listing
from igpt_batch.inputs.manifest_files import Columns
from igpt_batch.inputs.units import Unit, unit_tables
from igpt_batch.store.decide import Bucket, decide
from igpt_batch.store.layout import Store
from igpt_batch.store.plan_rows import META, STATED, bucket_of, empty_meta, planned, stat_bucket_of, stat_rows

EXAMPLES = 5  # duplicate ids named in the message
# a split task takes up to this many buckets' rows (plan_bucket_rows each) before it writes its parts: each writes a
# part to every bucket, so units of several buckets' rows make fewer, larger parts
SPLIT_BUCKETS = 4


@dataclass(frozen=True)
class Where:
    """What every task of one night's plan is given: the config, the store, the number of buckets, the table version
    planned against (None: no table yet)."""

    cfg: JobConfig
    url: str
    storage_options: dict
    version: str
    n: int
    table_version: int | None

    def planning(self):
        return Store(self.url, self.storage_options).planning(self.version, self.cfg.refresh.planning_folder)


@dataclass(frozen=True)
class Refused:
    """An error a task met (a bad manifest, an unreadable file), handed back for the driver to raise as it is."""

    kind: type
    message: str

    def raise_(self):
        raise self.kind(self.message)


@dataclass(frozen=True)
class Decided:
    """What decide task B hands back: its bucket and rows to compute, or the duplicate ids it found instead."""

    bucket: Bucket | None
    compute: pa.Table | None
    duplicates: int = 0
    examples: tuple[tuple[int, str], ...] = ()  # (order key, id) of the first few duplicates


def guarded(fn, *args):
    """fn(*args), or Refused for a manifest, config or job error (a Ray task's exception would carry its traceback
    into the message)."""
    try:
        return fn(*args)
    except (UsageError, JobError) as e:
        return Refused(type(e), str(e))


def duplicate_ids(ids: pa.Array, keys: pa.Array) -> tuple[int, list[tuple[int, str]]]:
    """(how many ids occur more than once, the first few of them by order key), with one sort of the ids."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if len(ids) < 2:
        return 0, []
    s = ids.take(pc.sort_indices(ids))
    repeated = pc.equal(s.slice(1), s.slice(0, len(s) - 1))
    if not pc.any(repeated).as_py():
        return 0, []
    dups = pc.unique(s.slice(1).filter(repeated))
    t = pa.table({"id": ids, "key": keys}).filter(pc.is_in(ids, value_set=dups))
    first = t.group_by("id").aggregate([("key", "min")]).sort_by("key_min").slice(0, EXAMPLES)
    return len(dups), list(zip(first.column("key_min").to_pylist(), first.column("id").to_pylist()))


def split_manifest(where: Where, listing: Listing, unit: Unit) -> np.ndarray:
    """Round 1: one manifest unit into manifest/bucket=B/ by folder or prefix. Returns its rows per bucket."""
    cols = Columns.of(where.cfg.input)
    tables = (planned(key, t) for key, t in unit_tables(listing, unit, cols, digest=True))
    return _write_parts(where, "manifest", unit.index, tables, lambda t: stat_bucket_of(t, where.n))


def split_current(where: Where, index: int, fragments: list[int]) -> np.ndarray:
    """Round 1: the metadata columns of some of the current table's fragments into current/bucket=B/ by id."""
    ds = Store(where.url, where.storage_options).open(where.version, where.table_version)
    batches = ds.to_batches(columns=list(META), fragments=[ds.get_fragment(f) for f in fragments], batch_size=65536,
                            fragment_readahead=1, batch_readahead=1)
    tables = (pa.Table.from_batches([b]) for b in batches)
    return _write_parts(where, "current", index, tables, lambda t: bucket_of(t.column("id"), where.n))


def _write_parts(where: Where, kind: str, index: int, tables: Iterable[pa.Table], bucket) -> np.ndarray:
    """`tables` into kind/bucket=B/part-<index>-<k>.parquet, SPLIT_BUCKETS * plan_bucket_rows rows at a time (each
    part one whole file, written in one put); `bucket(t)` is the bucket of each row. Returns rows per bucket."""
    planning, counts, held, k = where.planning(), np.zeros(where.n, np.int64), [], 0

    def flush():
        t = pa.concat_tables(held)
        for b, part in by_bucket(t, bucket(t), where.n):
            if part.num_rows:
                planning.write_table(Store.planning_part(kind, b, f"{index:06d}-{k:04d}"), part)
                counts[b] += part.num_rows
        held.clear()
        pa.default_memory_pool().release_unused()

    for t in tables:
        held.append(t)
        if sum(h.num_rows for h in held) >= SPLIT_BUCKETS * where.cfg.refresh.plan_bucket_rows:
            flush()
            k += 1
    if held:
        flush()
    return counts


def by_bucket(t: pa.Table, bucket: np.ndarray, n: int) -> Iterator[tuple[int, pa.Table]]:
    """(b, t's rows in bucket b) for every b in 0..n-1 (empty ones too), with one sort instead of n filters."""
    order = np.argsort(bucket, kind="stable")
    t, bounds = t.take(order), np.searchsorted(bucket[order], np.arange(n + 1))
    for b in range(n):
        yield b, t.slice(bounds[b], bounds[b + 1] - bounds[b])


def bucket_parts(planning, kind: str, b: int) -> list[str]:
    """The part files in kind/bucket=b/ (paths), sorted: one listing of the bucket's own folder."""
    folder = planning.path(Store.planning_bucket(kind, b))
    planning.fs.invalidate_cache(folder)  # object stores cache listings, and a Ray worker outlives a night
    try:
        found = planning.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))


def read_parts(planning, paths: list[str]) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    for p in paths:
        yield pq.read_table(p, filesystem=planning.fs)


def stat_bucket(where: Where, b: int) -> Counter:
    """Round 2: stat manifest/bucket=b/ (twice plan_bucket_rows at a time: nearly always all of it, so every folder
    is listed once) into stat/bucket=I/ by id bucket I. Returns the lists and HEADs made."""
    planning, io, held, k, step = where.planning(), Counter(), [], 0, 2 * where.cfg.refresh.plan_bucket_rows
    paths = bucket_parts(planning, "manifest", b)
    for i, t in enumerate(read_parts(planning, paths)):
        held.append(t)
        if i + 1 < len(paths) and sum(h.num_rows for h in held) < step:
            continue
        t = pa.concat_tables(held)
        held.clear()
        st, made = stat_rows(t, where.cfg)
        io.update(made)
        ids = bucket_of(t.column("id"), where.n)
        t = pa.table({**{c: t.column(c) for c in t.column_names}, **{c: st.column(c) for c in st.column_names}})
        for i_b, part in by_bucket(t.cast(STATED), ids, where.n):
            if part.num_rows:
                planning.write_table(Store.planning_part("stat", i_b, f"{b:06d}-{k:04d}"), part)
        k += 1
    return io


def decide_bucket(where: Where, b: int, failed: pa.Table, pending: str | None) -> Decided:
    """Round 3: id bucket b's stat rows decided against its previous rows; its ids checked first (a duplicate
    anywhere in the manifest meets its twin here)."""
    planning = where.planning()
    man = pa.concat_tables([STATED.empty_table(), *read_parts(planning, bucket_parts(planning, "stat", b))])
    count, examples = duplicate_ids(man.column("id"), man.column("row"))
    if count:
        return Decided(None, None, count, tuple(examples))
    prev = pa.concat_tables([empty_meta(), *read_parts(planning, bucket_parts(planning, "current", b))],
                            promote_options="permissive")
    bucket, compute = decide(man, prev, failed, where.cfg, pending)
    return Decided(bucket, compute)
