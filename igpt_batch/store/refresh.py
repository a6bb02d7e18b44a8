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
from igpt_batch.errors import JobError, LeaseError
from igpt_batch.model import checkpoint
from igpt_batch.redact import redact_text, scrub_secrets
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import Folder, Lease
from igpt_batch.store.layout import LIVE, SNAPSHOT_FORMAT, Store
from igpt_batch.store.merge import failed_record, merge
from igpt_batch.store.night_config import night_config
from igpt_batch.store.night_plan import NightPlan, plan_night

log = logging.getLogger("igpt_batch")
SMALL = 1000  # computed_ids / failed_ids are returned only up to this many


@dataclass
class Night:
    """One night: its plan, the snapshot it publishes and what it produced, handed from step to step."""

    store: Store
    version: str
    info: checkpoint.CheckpointInfo
    layers: list[int]
    plan: NightPlan
    summary: dict
    snapshot: str | None = None  # the snapshot id this night publishes (None: nothing to do)
    errors: pa.Table = field(default_factory=lambda: pa.table({"id": pa.array([], pa.string())}))
    meta: dict = field(default_factory=dict)

    @property
    def dropped(self) -> bool:
        return self.summary["dropped"] > 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def version_of(cfg: JobConfig, info: checkpoint.CheckpointInfo) -> tuple[str, dict]:
    """The store version: the extract task's compatibility keys minus what may differ between nights."""
    from igpt_batch.run.tasks.extract import Extract

    keys = Extract().version_keys(cfg, info)
    return "v-" + hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12], keys


def _snapshot_id(store: Store, version: str) -> str:
    """A new snapshot id that sorts by time after the last kept snapshot and names nothing that exists yet (a clock
    behind the last one starts one second after it)."""
    kept = store.kept_snapshots(version)
    t, last = _now(), max(kept) if kept else None
    if last:
        t = max(t, dt.datetime.strptime(last, SNAPSHOT_FORMAT).replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=1))
    while store.taken(version, t.strftime(SNAPSHOT_FORMAT)) or (last and t.strftime(SNAPSHOT_FORMAT) <= last):
        t += dt.timedelta(seconds=1)
    return t.strftime(SNAPSHOT_FORMAT)


def _summary(cfg: JobConfig, version: str, plan: NightPlan) -> dict:
    """The night's summary as planned (docs/REFRESH.md); later steps fill in errors, rows and pruned."""
    c, gone = plan.counts, plan.gone
    dropped = gone.num_rows if cfg.refresh.deleted == "drop" else 0
    return {"version": version, "snapshot": None, "manifest_rows": c.manifest_rows, "new": c.new,
            "changed": c.changed, "unchanged": c.unchanged, "revived": c.revived, "deleted": plan.newly_deleted,
            "dropped": dropped, "metadata_updates": plan.touch.num_rows, "computed": plan.compute.num_rows, "errors": 0,
            "failed_unchanged": c.failed_unchanged, "current_rows": c.previous_rows,
            "live_rows": c.previous_rows - c.previous_deleted, "precheck": c.precheck(),
            "stat": {"lists": plan.stat["lists"], "heads": plan.stat["heads"]}, "pruned": []}


def start_night(cfg: JobConfig, store: Store, version: str, info, layers) -> Night:
    """Step 1: the night's plan (every manifest row decided against the current table), and its snapshot id."""
    pending = store.pending(version)
    plan = plan_night(cfg, store, version, store.read_failed(version), pending and pending["snapshot"])
    night = Night(store, version, info, layers, plan, _summary(cfg, version, plan))
    if plan.compute.num_rows or plan.touch.num_rows or plan.newly_deleted or night.dropped:
        night.snapshot = pending["snapshot"] if pending and plan.compute.num_rows else _snapshot_id(store, version)
        night.summary["snapshot"] = night.snapshot
    return night


def run_extract(cfg: JobConfig, night: Night) -> None:
    """Step 2: embed the rows to compute into snapshots/<snapshot>/ with the ordinary driver (resuming a killed
    night), from the night's working manifest (removed when the night ends: it holds fetchable uris)."""
    compute = night.plan.compute
    if not compute.num_rows:
        return
    from igpt_batch.run.tasks.extract import Extract

    store, version, snapshot = night.store, night.version, night.snapshot
    sub = copy.deepcopy(cfg)
    sub.input.manifest = store.write_night_manifest(version, snapshot, night_rows(cfg, compute))
    sub.input.id_column, sub.input.uri_column = "id", "uri"  # the night manifest's own columns, whatever the user's
    sub.input.bytes_column = "bytes" if cfg.input.bytes_column else None
    sub.input.member_column = "member" if compute.column("member").null_count < compute.num_rows else None
    sub.output.path, sub.output.overwrite = store.snapshot_url(version, snapshot), False
    sub.output.format = "parquet"  # a snapshot is Parquet parts, merged into the store's own Lance table
    sub.run.max_error_fraction = 1.0  # the night's fraction counts against the whole manifest, below
    result = run_job(sub, Extract(), info=night.info, on_mismatch="overwrite")
    night.summary[Extract.name] = {k: result[k] for k in ("shards", "shards_skipped", "shards_run", "wall_s")}
    errors = read_output(sub.output.path, "errors", cfg.storage_options)
    night.errors = errors if errors.num_rows else night.errors
    rows = night.summary["manifest_rows"]
    if night.errors.num_rows / rows > cfg.run.max_error_fraction:
        raise JobError(f"{night.errors.num_rows} of {rows} manifest rows failed tonight, over run.max_error_fraction="
                       f"{cfg.run.max_error_fraction}; nothing published, the next run resumes snapshot {snapshot}")


def night_rows(cfg: JobConfig, compute: pa.Table):
    """The night manifest's tables: id, uri (and member for tar rows), in manifest order; with a bytes column, the
    images of those rows, read again from the user's manifest (planning never holds them)."""
    cols = ["id", "uri"] + (["member"] if compute.column("member").null_count < compute.num_rows else [])
    if not cfg.input.bytes_column:
        yield compute.select(cols)
        return
    from igpt_batch.inputs.listing import list_inputs
    from igpt_batch.inputs.manifest_files import Columns
    from igpt_batch.inputs.units import FILE_SHIFT, file_tables

    listing = list_inputs(cfg.input.manifest, cfg.storage_options)
    keys = compute.column("row").to_numpy()  # order keys: file index << FILE_SHIFT | row in the file
    files = keys >> FILE_SHIFT
    for f in np.unique(files).tolist():  # only the files that hold rows to compute
        want, row = pa.array(keys[files == f] & ((1 << FILE_SHIFT) - 1)), 0
        for t in file_tables(listing.fs, listing.files[f], Columns.of(cfg.input)):
            mine = pc.is_in(pa.array(np.arange(row, row + t.num_rows)), value_set=want)
            row += t.num_rows
            if pc.any(mine).as_py():
                yield t.filter(mine).select(["id", "uri", "bytes"])


def publish(cfg: JobConfig, night: Night, rows: pa.RecordBatchReader, drop_ids: pa.Array | None) -> None:
    """Step 4: the failed-rows record, then the night's one Lance commit, then its snapshot's tag and the latest
    pointer."""
    store, version, snapshot = night.store, night.version, night.snapshot
    store.write_failed(version, failed_record(night))
    ds = store.commit(version, snapshot, rows, drop_ids)
    store.publish(version, snapshot, ds.version)
    live = ds.count_rows(LIVE)
    night.summary |= {"errors": night.errors.num_rows, "current_rows": ds.count_rows(), "live_rows": live}


def prune(cfg: JobConfig, night: Night) -> None:
    """Step 5: keep the newest refresh.keep_current snapshots, compact past the threshold, update the vector index."""
    from igpt_batch.store.index import update_index

    night.summary["pruned"] = night.store.prune(night.version, cfg.refresh.keep_current, cfg.refresh.compact_fragments)
    trained = update_index(night.store, night.version, cfg.refresh.index_min_rows)
    if trained:
        night.summary["index"] = trained


def find_duplicates(cfg: JobConfig, night: Night) -> None:
    """Step 6, with refresh.dup_threshold: tonight's embedded rows searched for near-duplicates (store/dedup.py)."""
    from igpt_batch.store.dedup import night_duplicates

    if cfg.refresh.dup_threshold is None:
        return
    ids = night.plan.compute.column("id")
    ids = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=night.errors.column("id"))))
    night.summary["duplicates"] = night_duplicates(night.store, night.version, night.snapshot, ids,
                                                   cfg.refresh.dup_threshold)


def refresh(cfg: JobConfig) -> dict:
    """One night: plan against the current table, embed new and changed rows, merge, publish its snapshot, prune."""
    cfg = night_config(cfg)  # refresh.score -> extract.score; --dtype auto -> the store's dtype
    info = checkpoint.read_info(cfg.model.name, cfg.storage_options)  # read once a night: the weights are hashed once
    try:  # one night at a time per store: a second refresh is refused, naming the first
        with Lease(Folder(cfg.refresh.store, cfg.storage_options), cfg.run.lease_timeout):
            return _recorded_night(cfg, info)
    except LeaseError as e:
        raise JobError(str(e)) from None


def _recorded_night(cfg: JobConfig, info: checkpoint.CheckpointInfo) -> dict:
    """A night with its record saved in the store (Store.night_summaries) and its working files removed, whether
    it succeeded or failed; first the repairs a killed night needs."""
    version, keys = version_of(cfg, info)
    store = Store(cfg.refresh.store, cfg.storage_options)
    record = {"started_at": _iso_now(), "status": "failed", "version": version}
    try:
        store.sweep(version)  # working files of a killed night; a table never committed
        store.finish_interrupted(version)
        store.repair_latest(version)
        s = _night(cfg, info, store, version, keys)
        record |= {"status": "ok", "summary": {k: v for k, v in s.items() if k not in ("computed_ids", "failed_ids")}}
        return s
    except BaseException as e:
        record["error"] = _safe(f"{type(e).__name__}: {e}", cfg.storage_options)
        raise
    finally:
        try:
            store.end_night(version)
            store.save_night(version, record | {"ended_at": _iso_now()})
        except Exception as e:  # noqa: BLE001 - the night's own outcome (or error) is what the user must see
            log.warning("refresh %s: could not remove the night's working files or save its record: %s", version,
                        _safe(str(e), cfg.storage_options))


def _iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _safe(text: str, storage_options: dict) -> str:
    """A message as safe to keep in the store: every URL in it redacted, every storage option value '***'."""
    return scrub_secrets(redact_text(text), storage_options)


def _night(cfg: JobConfig, info: checkpoint.CheckpointInfo, store: Store, version: str, keys: dict) -> dict:
    layers = checkpoint.resolve_layers(cfg.extract.layers, info.n_layer)
    night = start_night(cfg, store, version, info, layers)
    s = night.summary
    if night.snapshot is None:
        s["message"] = f"nothing to embed: {s['unchanged']} rows unchanged"
        log.info("refresh %s: %s", version, s["message"])
        find_duplicates(cfg, night)  # nothing new: searches nothing
        return s
    log.info("refresh %s/%s: %d new, %d changed, %d unchanged, %d deleted -> %d to embed", version, night.snapshot,
             s["new"], s["changed"], s["unchanged"], s["deleted"], s["computed"])
    auto = {"dtype_auto_from": cfg.model.dtype_auto_from} if cfg.model.dtype_auto_from else {}
    store.create_version(version, {**keys, "model": cfg.model.name, "n_embd": info.n_embd, "n_px": info.n_px,
                                   "created_at": _now().isoformat(), **auto})
    run_extract(cfg, night)
    publish(cfg, night, *merge(cfg, night))
    prune(cfg, night)
    find_duplicates(cfg, night)
    log.info("refresh done: %s", s)
    if night.plan.compute.num_rows <= SMALL:
        s["computed_ids"] = night.plan.compute.column("id").to_pylist()
        s["failed_ids"] = night.errors.column("id").to_pylist()
    return s


def read_current(store: str, storage_options: dict | None = None, version: str | None = None,
                 snapshot: str | None = None, include_deleted: bool = False) -> pa.Table:
    """The current table of a store: the latest version's latest snapshot, or the kept `snapshot` (time travel)."""
    st = Store(store, storage_options)
    version = st.resolve(version)
    st.open_current(version)  # UsageError before any night has finished
    return st.read(version, snapshot, include_deleted=include_deleted)
