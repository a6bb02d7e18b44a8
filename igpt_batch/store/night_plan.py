"""A night's plan (NightPlan): stat the manifest by listings, join it with the current table per hash bucket of id,
decide every row.

With more than refresh.plan_bucket_rows rows a night is planned in three rounds of tasks (store/plan_tasks.py), so no
process holds more than a bucket and the driver holds counts: split (manifest units and ranges of Lance fragments into
bucket files), stat (by hash of each row's folder or prefix, so each is listed once in the night) and decide (by hash
of id, where duplicate ids meet)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import pyarrow as pa

from igpt_batch.config import JobConfig
from igpt_batch.errors import JobError, ManifestError
from igpt_batch.inputs.listing import Listing, list_inputs
from igpt_batch.inputs.manifest_files import Columns
from igpt_batch.inputs.units import Unit, unit_tables, units
from igpt_batch.redact import redact_text, redact_uri
from igpt_batch.store.decide import Bucket, Counts, as_mask, decide
from igpt_batch.store.layout import Store
from igpt_batch.store.plan_rows import META, PLANNED, bucket_of, empty_meta, planned, stat_rows
from igpt_batch.store.plan_tasks import (
    SPLIT_BUCKETS,
    Decided,
    Refused,
    Where,
    decide_bucket,
    duplicate_ids,
    guarded,
    split_current,
    split_manifest,
    stat_bucket,
)


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


def plan_night(cfg: JobConfig, store: Store, version: str, failed: pa.Table, pending: str | None) -> NightPlan:
    """Decide every manifest row. Up to refresh.plan_bucket_rows rows are planned here (counted from Parquet footers
    and listings; guessed from the size of CSV, JSONL and tar files); more in rounds of tasks (Ray tasks with the
    ray executor; see the module's docstring), through the planning folder, which holds fetchable uris and is
    removed when planning ends, whether it succeeded or not."""
    listing = list_inputs(cfg.input.manifest, cfg.storage_options)
    parts = units(listing, SPLIT_BUCKETS * cfg.refresh.plan_bucket_rows)
    n = max(1, -(-sum(u.rows for u in parts) // cfg.refresh.plan_bucket_rows))
    if n == 1:
        return _plan_here(cfg, store, version, failed, pending, listing, parts)
    planning = store.planning(version, cfg.refresh.planning_folder)
    planning.remove("")
    try:
        return _plan_in_tasks(cfg, store, version, failed, pending, listing, parts, n)
    finally:
        planning.remove("")


def _plan_here(cfg: JobConfig, store: Store, version: str, failed: pa.Table, pending: str | None, listing: Listing,
               parts: list[Unit]) -> NightPlan:
    """A small night, in this process: the manifest and the current table's metadata columns in one bucket."""
    prev = store.read(version, columns=list(META))
    prev = prev if prev.num_rows or prev.num_columns else empty_meta()
    man = pa.concat_tables([PLANNED.empty_table(), *_manifest_rows(cfg, listing, parts)])
    _refuse(cfg, man.num_rows, [Decided(None, None, *_duplicates(man))])
    st, io = stat_rows(man, cfg)
    man = pa.table({**{c: man.column(c) for c in man.column_names}, **{c: st.column(c) for c in st.column_names}})
    bucket, compute = decide(man, prev, failed, cfg, pending)
    return NightPlan(compute, [bucket], io)


def _duplicates(man: pa.Table) -> tuple:
    count, examples = duplicate_ids(man.column("id"), man.column("row"))
    return count, tuple(examples)


def _plan_in_tasks(cfg: JobConfig, store: Store, version: str, failed: pa.Table, pending: str | None,
                   listing: Listing, parts: list[Unit], n: int) -> NightPlan:
    """The three rounds: split, stat, decide (plan_tasks); this process holds counts, and the rows to compute."""
    ds = store.open(version)
    where = Where(cfg, store.url, store.storage_options, version, n, ds and ds.version)
    bare = Listing(listing.fs, listing.holds, [], listing.base)  # a task's unit names its own files
    split = [(split_manifest, (where, bare, u)) for u in parts]
    ranges = _fragment_ranges(ds, SPLIT_BUCKETS * cfg.refresh.plan_bucket_rows)
    split += [(split_current, (where, i, f)) for i, f in enumerate(ranges)]
    del ds
    rows = int(sum(c.sum() for c in _run(cfg, split)[:len(parts)]))
    _refuse(cfg, rows, [])
    io = sum(_run(cfg, [(stat_bucket, (where, b)) for b in range(n)]), Counter())
    failed_at = bucket_of(failed.column("id"), n)
    decided = _run(cfg, [(decide_bucket, (where, b, failed.filter(pa.array(failed_at == b)), pending))
                         for b in range(n)])
    _refuse(cfg, rows, decided)
    compute = pa.concat_tables([d.compute for d in decided])
    return NightPlan(compute.sort_by("row"), [d.bucket for d in decided], io)


def _fragment_ranges(ds, rows: int) -> list[list[int]]:
    """The current table's fragment ids, in ranges of about `rows` rows (a fragment is never cut)."""
    out, acc = [], rows
    for frag in ds.get_fragments() if ds is not None else []:
        if acc >= rows:
            out.append([])
            acc = 0
        out[-1].append(frag.fragment_id)
        acc += frag.physical_rows
    return out


def _refuse(cfg: JobConfig, rows: int, decided: list[Decided]) -> None:
    """ManifestError for an empty manifest or duplicate ids (counted per bucket; the first few named)."""
    where = redact_uri(cfg.input.manifest)
    if rows == 0:
        raise ManifestError(f"manifest {where} is empty: no rows to process")
    count = sum(d.duplicates for d in decided)
    if count:
        names = ", ".join(repr(i) for _, i in sorted(e for d in decided for e in d.examples)[:5])
        raise ManifestError(f"manifest {where} has {count} duplicate ids (e.g. {names}); ids must be unique")


def _manifest_rows(cfg: JobConfig, listing: Listing, parts: list[Unit]) -> Iterator[pa.Table]:
    """The user's manifest (its id, uri, bytes and member columns as configured) as PLANNED tables, a batch at a
    time: images inside the manifest are hashed here, and their bytes dropped."""
    for unit in parts:
        for key, t in unit_tables(listing, unit, Columns.of(cfg.input), digest=True):
            yield planned(key, t)


def _run(cfg: JobConfig, calls: list[tuple]) -> list:
    """fn(*a) for every (fn, a): as Ray tasks with the ray executor, else one after another here. A manifest,
    config or job error in any is raised here as it was raised there; any other error in a Ray task is a JobError
    naming it (not its traceback)."""
    if cfg.run.executor != "ray":
        out = []
        for fn, a in calls:
            out.append(guarded(fn, *a))
            pa.default_memory_pool().release_unused()  # a task's pages, before the next task's
    else:
        import ray

        from igpt_batch.run.cluster import init_ray

        init_ray(cfg.run.address)
        task = ray.remote(num_cpus=1, max_retries=cfg.run.max_retries)(guarded)
        try:
            out = ray.get([task.remote(fn, *a) for fn, a in calls])
        except ray.exceptions.RayError as e:  # a task raised something else, or its worker died past its retries
            cause = getattr(e, "cause", None) or e
            why = redact_text(str(cause)) or "no detail"
            raise JobError(f"refresh planning failed in a task ({type(cause).__name__}: {why})") from None
    for r in out:
        if isinstance(r, Refused):
            r.raise_()
    return out
