"""Nightly incremental refresh: embed only new or changed images into a versioned Lance store, one commit a night."""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.config import JobConfig
from igpt_batch.errors import ConfigError, JobError, LeaseError
from igpt_batch.model import checkpoint
from igpt_batch.run.driver import run_job
from igpt_batch.run.storage import Folder, Lease, OutputFolder, read_output
from igpt_batch.store.layout import FAILED_SCHEMA, Store, current_schema
from igpt_batch.store.night_plan import STAT_SCHEMA, TOUCH, plan_night

log = logging.getLogger("igpt_batch")
SMALL = 1000  # computed_ids / failed_ids are returned only up to this many
TAKE = 4096  # ids per read of old rows (metadata updates, deletion marks)


@dataclass
class Night:
    """One night's plan and what it produced, handed from step to step."""

    store: Store
    version: str
    info: checkpoint.CheckpointInfo
    layers: list[int]
    summary: dict
    compute: pa.Table  # id, uri, size, mtime, etag of the rows to embed, in the order they are embedded
    touch: pa.Table  # TOUCH columns of unchanged rows whose metadata moved (or that come back from deleted)
    gone: pa.Table  # id, deleted of previous rows that left the manifest
    failed: pa.Table  # the failed-rows record's entries for ids in the manifest
    snap: str | None = None
    errors: pa.Table = field(default_factory=lambda: pa.table({"id": pa.array([], pa.string())}))
    meta: dict = field(default_factory=dict)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def version_of(cfg: JobConfig, info: checkpoint.CheckpointInfo) -> tuple[str, dict]:
    """The store version: the extract task's compatibility keys minus what may differ between nights."""
    from igpt_batch.run.tasks.extract import Extract

    keys = Extract().version_keys(cfg, info)
    return "v-" + hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12], keys


def _snapshot_id(store: Store, version: str) -> str:
    """A new snapshot id that sorts by time after the last night and names nothing that exists yet (a clock behind
    the last night starts one second after it)."""
    nights = store.nights(version)
    t, last = _now(), max(nights) if nights else None
    if last:
        t = max(t, dt.datetime.strptime(last, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=1))
    while store.taken(version, t.strftime("%Y%m%dT%H%M%SZ")) or (last and t.strftime("%Y%m%dT%H%M%SZ") <= last):
        t += dt.timedelta(seconds=1)
    return t.strftime("%Y%m%dT%H%M%SZ")


def plan(cfg: JobConfig, store: Store, version: str, info, layers) -> Night:
    """Step 1: decide every manifest row against the current table; pick the night's snapshot id."""
    pending = store.pending(version)
    p = plan_night(cfg, store, version, store.read_failed(version), pending and pending["snapshot"])
    c = p["counts"]
    compute = pa.concat_tables([t if isinstance(t, pa.Table) else store.scratch(version).read_table(t) for t in p["compute"]])
    store.scratch(version).remove("")
    gone = p["gone"]
    newly_deleted = int((~np.asarray(gone.column("deleted").to_numpy(zero_copy_only=False), bool)).sum())
    drop = cfg.refresh.deleted == "drop" and gone.num_rows > 0
    pre = {k[4:]: v for k, v in c.items() if k.startswith("pre_") and (v or k == "pre_hashed")}
    summary = {"version": version, "snapshot": None, "manifest_rows": c["manifest_rows"], "new": c["new"],
               "changed": c["changed"], "unchanged": c["unchanged"], "revived": c["revived"], "deleted": newly_deleted,
               "dropped": gone.num_rows if drop else 0, "metadata_updates": p["touch"].num_rows,
               "computed": compute.num_rows, "errors": 0, "failed_unchanged": c["failed_unchanged"],
               "current_rows": c["previous_rows"], "live_rows": c["previous_rows"] - c["previous_deleted"],
               "precheck": pre, "stat": {"lists": c.get("stat_lists", 0), "heads": c.get("stat_heads", 0)}, "pruned": []}
    night = Night(store, version, info, layers, summary, compute, p["touch"], gone, p["failed"])
    if compute.num_rows or p["touch"].num_rows or newly_deleted or drop:
        night.snap = pending["snapshot"] if pending and compute.num_rows else _snapshot_id(store, version)
        summary["snapshot"] = night.snap
    return night


def run_extract(cfg: JobConfig, night: Night) -> None:
    """Step 2: embed the rows to compute into snapshots/<snap>/ with the ordinary driver (resuming a killed night)."""
    if not night.compute.num_rows:
        return
    from igpt_batch.run.tasks.extract import Extract

    store, version, snap = night.store, night.version, night.snap
    sub = copy.deepcopy(cfg)
    sub.input.manifest = store.write_night_manifest(version, snap, night.compute)
    sub.output.path, sub.output.overwrite = store.snapshot_url(version, snap), False
    sub.run.max_error_fraction = 1.0  # the night's fraction counts against the whole manifest, below
    result = run_job(sub, Extract(), info=night.info, on_mismatch="overwrite")
    night.summary[Extract.name] = {k: result[k] for k in ("shards", "shards_skipped", "shards_run", "wall_s")}
    errors = read_output(sub.output.path, "errors", cfg.storage_options)
    night.errors = errors if errors.num_rows else night.errors
    rows = night.summary["manifest_rows"]
    if night.errors.num_rows / rows > cfg.run.max_error_fraction:
        raise JobError(f"{night.errors.num_rows} of {rows} manifest rows failed tonight, over run.max_error_fraction="
                       f"{cfg.run.max_error_fraction}; nothing published, the next run resumes snapshot {snap}")


def merge(cfg: JobConfig, night: Night) -> tuple[pa.RecordBatchReader, str | None]:
    """Step 3: the night's changes as rows to upsert on id (tonight's embeddings, metadata updates, deletion marks),
    streamed, and the predicate of the rows to delete (--deleted drop)."""
    out = OutputFolder(night.store.snapshot_url(night.version, night.snap), cfg.storage_options)
    parts = out.committed_files("embeddings") if night.compute.num_rows else []
    first = out.read_table(parts[0]).schema.metadata if parts else None
    night.meta = {k.decode(): v.decode() for k, v in (first or {}).items()} | {
        "version": night.version, "layers": ",".join(map(str, night.layers))}
    schema = current_schema(len(night.layers) * night.info.n_embd, night.meta)
    gone, drop = night.gone, night.summary["dropped"] > 0
    marks = gone.filter(pc.invert(gone.column("deleted"))).column("id") if not drop else pa.array([], pa.string())

    def batches():
        for rel in parts:
            emb = out.read_table(rel)
            st = night.compute.take(pc.index_in(emb.column("id"), value_set=night.compute.column("id")))
            yield pa.table({"id": emb.column("id"), "uri": emb.column("uri"), "sha256": emb.column("sha256"),
                            **{c: st.column(c) for c in STAT_SCHEMA.names}, "embedding": emb.column("embedding"),
                            "width": emb.column("width"), "height": emb.column("height"),
                            "snapshot": pa.array([night.snap] * emb.num_rows, pa.string()),
                            "deleted": pa.array(np.zeros(emb.num_rows, bool))}).cast(schema).to_batches()
        touch = night.touch.append_column("deleted", pa.array(np.zeros(night.touch.num_rows, bool)))
        updates = pa.concat_tables([touch, pa.table({"id": marks, "deleted": pa.array(np.ones(len(marks), bool))})],
                                   promote_options="default")
        for s in range(0, updates.num_rows, TAKE):
            yield _updated(night, updates.slice(s, TAKE), schema).to_batches()

    reader = pa.RecordBatchReader.from_batches(schema, (b for bs in batches() for b in bs))
    return reader, (_id_in(gone.column("id")) if drop else None)


def _id_in(ids: pa.Array) -> str:
    return "id IN (" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids.to_pylist()) + ")"


def _updated(night: Night, updates: pa.Table, schema: pa.Schema) -> pa.Table:
    """The previous rows of `updates`' ids with their new uri/size/mtime/etag (a deletion mark, with a null uri,
    keeps them) and deleted flag."""
    old = night.store.read(night.version, filter=_id_in(updates.column("id")))
    new = updates.take(pc.index_in(old.column("id"), value_set=updates.column("id")))
    touched = pc.is_valid(new.column("uri"))
    for c in (*TOUCH[1:], "deleted"):
        fresh = new.column(c) if c == "deleted" else pc.if_else(touched, new.column(c).cast(schema.field(c).type), old.column(c))
        old = old.set_column(old.schema.get_field_index(c), c, fresh)
    return old.select(schema.names).cast(schema)


def publish(cfg: JobConfig, night: Night, rows: pa.RecordBatchReader, drop: str | None) -> None:
    """Step 4: the failed-rows record, then the night's one Lance commit, then its tag and the latest pointer."""
    store, version, snap = night.store, night.version, night.snap
    store.write_failed(version, failed_record(night))
    ds = store.commit(version, snap, rows, drop)
    store.publish(version, snap, ds.version)
    live = ds.count_rows("deleted = false")
    night.summary |= {"errors": night.errors.num_rows, "current_rows": ds.count_rows(), "live_rows": live}


def failed_record(night: Night) -> pa.Table:
    """Entries kept (not retried tonight) plus tonight's failures, which keep the night they first failed."""
    computed = night.compute.column("id")
    kept = night.failed.filter(pc.invert(pc.is_in(night.failed.column("id"), value_set=computed)))
    err = night.errors
    if not err.num_rows:
        return kept
    st = night.compute.take(pc.index_in(err.column("id"), value_set=computed))
    first = night.failed.column("first_night").take(pc.index_in(err.column("id"), value_set=night.failed.column("id")))
    tonight = pa.table({"id": err.column("id"), "uri": st.column("uri"), "sha256": pa.nulls(err.num_rows, pa.string()),
                        **{c: st.column(c) for c in STAT_SCHEMA.names}, "stage": err.column("stage"),
                        "reason": err.column("error"), "first_night": pc.fill_null(first, night.snap),
                        "last_night": pa.array([night.snap] * err.num_rows, pa.string())})
    return pa.concat_tables([kept.cast(FAILED_SCHEMA), tonight.cast(FAILED_SCHEMA)])


def prune(cfg: JobConfig, night: Night) -> None:
    """Step 5: keep the newest refresh.keep_current nights, compact past the threshold, update the vector index."""
    from igpt_batch.store.search import update_index

    night.summary["pruned"] = night.store.prune(night.version, cfg.refresh.keep_current,
                                                getattr(cfg.refresh, "compact_fragments", 32))
    update_index(night.store, night.version, getattr(cfg.refresh, "index_min_rows", 100_000))


def refresh(cfg: JobConfig) -> dict:
    """One night: plan against the current table, embed new and changed rows, merge, publish, prune."""
    if not cfg.refresh.store:
        raise ConfigError("refresh.store is required (--store)")
    if not cfg.input.manifest:
        raise ConfigError("input.manifest is required (--manifest)")
    info = checkpoint.read_info(cfg.model.name, cfg.storage_options)  # read once a night: the weights are hashed once
    try:  # one night at a time per store: a second refresh is refused, naming the first
        with Lease(Folder(cfg.refresh.store, cfg.storage_options), cfg.run.lease_timeout):
            return _night(cfg, info)
    except LeaseError as e:
        raise JobError(str(e)) from None


def _night(cfg: JobConfig, info: checkpoint.CheckpointInfo) -> dict:
    layers = checkpoint.resolve_layers(cfg.extract.layers, info.n_layer)
    version, keys = version_of(cfg, info)
    store = Store(cfg.refresh.store, cfg.storage_options)
    store.finish_interrupted(version)
    night = plan(cfg, store, version, info, layers)
    s = night.summary
    if night.snap is None:
        s["message"] = f"nothing to embed: {s['unchanged']} rows unchanged"
        log.info("refresh %s: %s", version, s["message"])
        nights = store.nights(version)
        if nights and store.latest().get("version") != version:
            store.set_latest(version, max(nights))
        return s
    log.info("refresh %s/%s: %d new, %d changed, %d unchanged, %d deleted -> %d to embed", version, night.snap,
             s["new"], s["changed"], s["unchanged"], s["deleted"], s["computed"])
    store.create_version(version, {**keys, "model": cfg.model.name, "n_embd": info.n_embd, "n_px": info.n_px,
                                   "created_at": _now().isoformat()})
    run_extract(cfg, night)
    publish(cfg, night, *merge(cfg, night))
    prune(cfg, night)
    log.info("refresh done: %s", s)
    if night.compute.num_rows <= SMALL:
        s["computed_ids"] = night.compute.column("id").to_pylist()
        s["failed_ids"] = night.errors.column("id").to_pylist()
    return s


def read_current(store: str, storage_options: dict | None = None, version: str | None = None,
                 snapshot: str | None = None, include_deleted: bool = False) -> pa.Table:
    """The current table of a store: the latest version's latest night, or the night `snapshot` (time travel)."""
    st = Store(store, storage_options)
    version = st.resolve(version)
    if st.open(version) is None:
        raise FileNotFoundError(f"{store}/{version} has no current table: no refresh has finished there yet")
    return st.read(version, snapshot, include_deleted=include_deleted)
