"""Nightly incremental refresh: embed only new or changed images into a versioned store of current tables."""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import checkpoint, images
from .config import ConfigError, JobConfig
from .driver import compat_keys, run_job
from .manifest import read_manifest, scan_manifest
from .storage import OutputFolder, read_output, retry

log = logging.getLogger("igpt_batch")
PART_ROWS = 100_000  # rows per current/<snapshot>/part-*.parquet
THREADS = 16  # concurrent stats and re-reads during planning
SMALL = 1000  # computed_ids / failed_ids are returned only up to this many
META = ("id", "uri", "sha256", "size", "mtime", "etag", "deleted")  # the columns planning reads
STAT_SCHEMA = pa.schema([("size", pa.int64()), ("mtime", pa.string()), ("etag", pa.string())])


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def current_schema(dim: int, metadata: dict | None = None) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("uri", pa.string()), ("sha256", pa.string()), ("size", pa.int64()),
                      ("mtime", pa.string()), ("etag", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      ("width", pa.int32()), ("height", pa.int32()), ("snapshot", pa.string()), ("deleted", pa.bool_())],
                     metadata=metadata)


def version_of(cfg: JobConfig) -> tuple[str, dict, checkpoint.CheckpointInfo, list[int]]:
    """The store version: everything that makes two embeddings incomparable. A change starts a new version."""
    info = checkpoint.read_info(cfg.model.name)
    layers = checkpoint.resolve_layers(cfg.extract.layers, info.n_layer)
    keys = {"weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash, "layers": layers,
            "dtype": cfg.model.dtype, "n_px": info.n_px, "draft": cfg.input.draft}
    return "v-" + hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12], keys, info, layers


def _stat(uri: str, so: dict, timeout: float) -> dict | None:
    """{size, mtime, etag} of a source without reading its bytes; None when the store cannot say."""
    try:
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if not scheme or scheme in ("file", "local"):  # as images.read_bytes: file:// URLs are percent-encoded
            path = uri if not scheme else os.fsdecode(urllib.parse.unquote_to_bytes(uri.split("://", 1)[1]))
            st = os.stat(path)
            return {"size": st.st_size, "mtime": str(st.st_mtime_ns), "etag": None}
        if scheme in ("http", "https"):  # as images.read_bytes: only storage_options["headers"] applies to http(s)
            fs, path = fsspec.filesystem("http", **({"client_kwargs": {"headers": so["headers"]}} if so.get("headers") else {})), uri
        else:
            fs, path = fsspec.core.url_to_fs(uri, **so)
        fs.invalidate_cache(path)  # object stores cache listings; tonight's answer must be fresh
        info = images._with_deadline(lambda: fs.info(path), timeout, uri)
    except Exception:  # missing, denied, timed out: decided by reading (and the worker records the error)
        return None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    etag = info.get("ETag") or info.get("etag")
    return {"size": info.get("size"), "mtime": mtime.isoformat() if isinstance(mtime, dt.datetime) else
            (None if mtime is None else str(mtime)), "etag": None if etag is None else str(etag).strip('"')}


def _sha(uri: str, cfg: JobConfig) -> str | None:
    try:
        data = images.read_bytes(uri, cfg.storage_options, timeout=cfg.input.read_timeout, max_bytes=cfg.input.max_bytes)
    except images.ImageError:
        return None
    return hashlib.sha256(data).hexdigest()


def _pmap(fn, items: pa.Array) -> Iterator[list]:
    """fn over items in a bounded thread pool, yielding a chunk of results at a time (millions of rows never make
    millions of futures, nor one Python object per row beyond the chunk)."""
    with ThreadPoolExecutor(THREADS, thread_name_prefix="igpt-refresh") as pool:
        for s in range(0, len(items), 4096):
            yield list(pool.map(fn, items[s:s + 4096].to_pylist()))


def _stat_table(uris: pa.Array, so: dict, timeout: float) -> pa.Table:
    """size, mtime, etag of every uri as Arrow columns; nulls where the store cannot say."""
    parts = [pa.Table.from_pylist([st or {} for st in chunk], schema=STAT_SCHEMA)
             for chunk in _pmap(lambda u: _stat(u, so, timeout), uris)]
    return pa.concat_tables(parts) if parts else STAT_SCHEMA.empty_table()


def _read_prev(vdir: OutputFolder, pointer: dict | None) -> pa.Table:
    """The previous current table's planning columns (no embeddings), in the order of its parts."""
    if not pointer:
        return current_schema(1).empty_table().select(list(META))
    return pa.concat_tables([pq.read_table(vdir.path(f), columns=list(META), filesystem=vdir.fs) for f in pointer["files"]])


def _differs(a: pa.Array, b: pa.Array) -> np.ndarray:
    """a != b elementwise, where null equals only null (as Python's None)."""
    ne = pc.fill_null(pc.not_equal(a, b), False)
    return _np(pc.or_(ne, pc.xor(pc.is_null(a), pc.is_null(b))))


def _np(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _snapshot_id(vdir: OutputFolder, pointer: dict | None) -> str:
    """A new snapshot id that sorts by time after the previous one and names nothing that exists yet (a clock behind
    the previous night's starts one second after it)."""
    t = _now()
    if pointer:
        t = max(t, dt.datetime.strptime(pointer["snapshot"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
                + dt.timedelta(seconds=1))
    while True:
        sid = t.strftime("%Y%m%dT%H%M%SZ")
        if (not pointer or sid > pointer["snapshot"]) and not vdir.exists(f"snapshots/{sid}") and not vdir.exists(f"current/{sid}"):
            return sid
        t += dt.timedelta(seconds=1)


def current_tables(vdir: OutputFolder) -> list[str]:
    """Snapshot ids of the current/<snapshot>/ tables a version folder holds, oldest first. Found by their files,
    not by listing folders: some stores keep an emptied folder as a prefix."""
    top = vdir.path("current")
    vdir.fs.invalidate_cache(top)  # object stores cache listings
    if not vdir.exists("current"):
        return []
    files = retry(lambda: vdir.fs.find(top), "list current/")
    return sorted({posixpath.relpath(f, top).split("/", 1)[0] for f in files})


def _prune_current(vdir: OutputFolder, live: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` current/<snapshot>/ tables (never the live one); returns their ids.
    Nothing computed is lost: every embedding in them also lives in its night's snapshots/<id>/."""
    if keep <= 0:
        return []
    old = [sid for sid in current_tables(vdir)[:-keep] if sid != live]
    for sid in old:
        vdir.remove(f"current/{sid}")
    if old:
        log.info("refresh: removed %d old current table(s): %s", len(old), ", ".join(old))
    return old


def refresh(cfg: JobConfig) -> dict:
    """One night: plan against the last current table, embed new and changed rows with run_job, write the new current."""
    store, so = cfg.refresh.store, cfg.storage_options
    if not store:
        raise ConfigError("refresh.store is required (--store)")
    if not cfg.input.manifest:
        raise ConfigError("input.manifest is required (--manifest)")
    version, vkeys, info, layers = version_of(cfg)
    vurl = _join(store, version)
    root, vdir = OutputFolder(store, so), OutputFolder(vurl, so)
    table = read_manifest(cfg.input.manifest, so)
    ids, n = table.column("id").combine_chunks(), table.num_rows
    pointer = vdir.read_json("_CURRENT.json")
    prev = _read_prev(vdir, pointer)

    # Planning runs on Arrow columns aligned to the manifest's rows (`was`: the previous row of the same id).
    # Every row is stat-ed before any bytes are read: a source that changes after its stat is caught the next night.
    st = _stat_table(table.column("uri").combine_chunks(), so, cfg.input.read_timeout)
    at = pc.index_in(ids, value_set=prev.column("id"))  # row in prev, null for a new id
    was = prev.select(["uri", *STAT_SCHEMA.names, "deleted"]).take(at)
    known = _np(pc.is_valid(at))
    same_uri = _np(pc.equal(table.column("uri"), was.column("uri")))
    both_etag = _np(pc.not_equal(was.column("etag"), "")) & _np(pc.not_equal(st.column("etag"), ""))
    by_etag = known & same_uri & both_etag & _np(pc.equal(was.column("etag"), st.column("etag")))
    by_size_mtime = known & same_uri & ~both_etag & _np(pc.equal(was.column("size"), st.column("size"))) \
        & _np(pc.equal(was.column("mtime"), st.column("mtime")))
    to_hash = np.flatnonzero(known & ~by_etag & ~by_size_mtime)
    shas = [sha for chunk in _pmap(lambda u: _sha(u, cfg), table.column("uri").take(to_hash).combine_chunks())
            for sha in chunk]
    same_bytes = np.array([sha is not None and sha == old for sha, old in
                           zip(shas, prev.column("sha256").take(at.take(to_hash)).to_pylist())], dtype=bool)
    unchanged = by_etag | by_size_mtime
    unchanged[to_hash[same_bytes]] = True
    changed = np.zeros(n, dtype=bool)
    changed[to_hash[~same_bytes]] = True  # different bytes, or unreadable now (the extract run records why)
    pre = {"etag": int(by_etag.sum()), "size_mtime": int(by_size_mtime.sum()), "hashed": len(to_hash),
           "hash_unchanged": int(same_bytes.sum())}
    pre = {k: v for k, v in pre.items() if v or k == "hashed"}
    # unchanged rows whose uri/size/mtime/etag moved (or that come back from deleted) keep their embedding
    was_deleted = _np(was.column("deleted"))
    moved = was_deleted | _differs(table.column("uri"), was.column("uri"))
    for c in STAT_SCHEMA.names:
        moved |= _differs(st.column(c), was.column(c))
    updates = pa.table({"id": ids, "uri": table.column("uri"), **{c: st.column(c) for c in STAT_SCHEMA.names}}) \
        .filter(pa.array(unchanged & moved))
    revived = int((unchanged & was_deleted).sum())
    prev_in_manifest = _np(pc.is_in(prev.column("id"), value_set=ids))
    prev_deleted = _np(prev.column("deleted"))
    gone, newly_deleted = int((~prev_in_manifest).sum()), int((~prev_in_manifest & ~prev_deleted).sum())
    drop = cfg.refresh.deleted == "drop" and bool(gone)
    compute = np.flatnonzero(~known | changed)  # manifest order
    compute_ids = ids.take(compute)
    summary = {"version": version, "snapshot": None, "manifest_rows": n, "new": int((~known).sum()),
               "changed": int(changed.sum()), "unchanged": int(unchanged.sum()), "revived": revived,
               "deleted": newly_deleted, "dropped": gone if drop else 0, "metadata_updates": updates.num_rows,
               "computed": len(compute), "errors": 0, "current_rows": prev.num_rows,
               "live_rows": prev.num_rows - int(prev_deleted.sum()), "precheck": pre, "pruned": []}
    pending = vdir.read_json("_PENDING.json")
    if pending and pointer and pending["snapshot"] <= pointer["snapshot"]:
        pending = None  # that night finished; only its clean-up was lost
    if not len(compute) and not updates.num_rows and not newly_deleted and not drop:
        summary["message"] = f"nothing to embed: {summary['unchanged']} rows unchanged"
        log.info("refresh %s: %s", version, summary["message"])
        if vdir.exists("_PENDING.json"):
            vdir.fs.rm(vdir.path("_PENDING.json"))
        if pointer and (root.read_json("_LATEST.json") or {}).get("version") != version:
            root.write_json("_LATEST.json", {"version": version, "snapshot": pointer["snapshot"], "updated_at": _now().isoformat()})
        return summary

    snap = pending["snapshot"] if pending and len(compute) else _snapshot_id(vdir, pointer)
    summary["snapshot"] = snap
    log.info("refresh %s/%s: %d new, %d changed, %d unchanged, %d deleted -> %d to embed", version, snap,
             summary["new"], summary["changed"], summary["unchanged"], newly_deleted, len(compute))
    if not vdir.exists("_version.json"):
        vdir.write_json("_version.json", {**vkeys, "model": cfg.model.name, "n_embd": info.n_embd, "created_at": _now().isoformat()})
    snap_url, emb = _join(vurl, "snapshots", snap), pa.table({"id": pa.array([], pa.string())})  # tonight's rows
    if len(compute):
        vdir.write_json("_PENDING.json", {"snapshot": snap, "started_at": _now().isoformat(), "rows": len(compute)})
        sink = pa.BufferOutputStream()
        pq.write_table(table.take(compute), sink)
        vdir.write_bytes(f"manifests/{snap}.parquet", sink.getvalue().to_pybytes())
        sub = copy.deepcopy(cfg)
        sub.input.manifest, sub.output.path, sub.output.overwrite = _join(vurl, "manifests", f"{snap}.parquet"), snap_url, False
        previous_job = OutputFolder(snap_url, so).read_json("_job.json")
        if previous_job is not None:  # resuming a crashed night: reuse its shards unless its plan no longer matches
            scan = scan_manifest(sub.input.manifest, so)
            keys = compat_keys(sub, "extract", info, layers, scan.rows, scan.fingerprint)
            if previous_job.get("compat") != json.loads(json.dumps(keys)):
                log.info("refresh: snapshot %s was planned differently; recomputing it", snap)
                sub.output.overwrite = True
        result = run_job(sub, "extract")
        summary["extract"] = {k: result[k] for k in ("shards", "shards_skipped", "shards_run", "wall_s")}
        emb = read_output(snap_url, "embeddings", so)
        if emb.num_rows:
            emb = emb.filter(pc.is_in(emb.column("id"), value_set=compute_ids))

    # merge: previous rows (metadata refreshed, deletions applied) then the rows embedded tonight
    done = emb.column("id")
    failed = compute_ids.filter(pc.invert(pc.is_in(compute_ids, value_set=done)))
    dim = len(layers) * info.n_embd
    if emb.schema.metadata:
        meta = dict(emb.schema.metadata)
    elif pointer:
        meta = dict(pq.read_schema(vdir.path(pointer["files"][0]), filesystem=vdir.fs).metadata or {})
    else:
        meta = {}
    meta |= {b"version": version.encode(), b"snapshot": snap.encode(), b"layers": ",".join(map(str, layers)).encode()}
    schema = current_schema(dim, meta)
    vdir.remove(f"current/{snap}")  # a crashed attempt at this night: none of its parts may outlive the rewrite
    parts, n_rows, n_deleted = [], 0, 0

    def emit(t: pa.Table) -> None:
        nonlocal n_rows, n_deleted
        for s in range(0, max(t.num_rows, 1), PART_ROWS):
            chunk = t.slice(s, PART_ROWS).cast(schema)
            parts.append(vdir.write_part(f"current/{snap}", f"part-{len(parts):05d}", chunk)["path"])
        n_rows += t.num_rows
        n_deleted += pc.sum(t.column("deleted")).as_py() or 0

    # the previous table's rows line up with `prev` (same parts, same order): masks are sliced part by part
    keep_all = _np(pc.invert(pc.is_in(prev.column("id"), value_set=done))) & (prev_in_manifest | (not drop))
    update_at = pc.index_in(prev.column("id"), value_set=updates.column("id"))  # row in updates, or null
    offset = 0
    for f in (pointer or {}).get("files", []):
        t = pq.read_table(vdir.path(f), filesystem=vdir.fs)
        rows = slice(offset, offset + t.num_rows)
        offset += t.num_rows
        keep = np.flatnonzero(keep_all[rows])
        if not len(keep):
            continue
        t, upd = t.take(keep), update_at[rows].take(keep)
        for c in ("uri", *STAT_SCHEMA.names):  # metadata refreshed where tonight's stat moved it
            fresh = pc.if_else(pc.is_valid(upd), updates.column(c).take(upd), t.column(c))
            t = t.set_column(t.schema.get_field_index(c), c, fresh.cast(schema.field(c).type))
        # a failed recompute keeps its stale row, and its old sha256
        t = t.set_column(t.schema.get_field_index("deleted"), "deleted", pa.array(~prev_in_manifest[rows][keep]))
        emit(t.select(schema.names))
    if emb.num_rows:
        night = st.take(pc.index_in(emb.column("id"), value_set=ids))  # tonight's stat of each embedded row
        emit(pa.table({"id": emb.column("id"), "uri": emb.column("uri"), "sha256": emb.column("sha256"),
                       **{c: night.column(c) for c in STAT_SCHEMA.names},
                       "embedding": emb.column("embedding"), "width": emb.column("width"), "height": emb.column("height"),
                       "snapshot": pa.array([snap] * emb.num_rows, pa.string()),
                       "deleted": pa.array(np.zeros(emb.num_rows, dtype=bool))}))
    if not parts:
        emit(schema.empty_table())
    now = _now().isoformat()
    vdir.write_json("_CURRENT.json", {"snapshot": snap, "path": _join(vurl, "current", snap), "files": parts, "rows": n_rows,
                                      "deleted": n_deleted, "live_rows": n_rows - n_deleted, "updated_at": now,
                                      "version": version, "computed": len(compute), "errors": len(failed)})
    root.write_json("_LATEST.json", {"version": version, "snapshot": snap, "updated_at": now})
    if vdir.exists("_PENDING.json"):
        vdir.fs.rm(vdir.path("_PENDING.json"))
    summary |= {"errors": len(failed), "current_rows": n_rows, "live_rows": n_rows - n_deleted,
                "pruned": _prune_current(vdir, snap, cfg.refresh.keep_current)}
    log.info("refresh done: %s", summary)
    if len(compute) <= SMALL:
        summary["computed_ids"] = compute_ids.to_pylist()
        summary["failed_ids"] = failed.to_pylist()
    return summary


def read_current(store: str, storage_options: dict | None = None, version: str | None = None,
                 include_deleted: bool = False) -> pa.Table:
    """The live current table of a store: the latest version (STORE/_LATEST.json) unless `version` names one."""
    root = OutputFolder(store, storage_options)
    if version is None:
        version = (root.read_json("_LATEST.json") or {}).get("version")
    if version is None:  # no pointer (an older store): the newest version folder
        found = root.fs.glob(root.path("v-*", "_version.json"))
        created = {f.split("/")[-2]: json.loads(root.fs.cat_file(f)).get("created_at", "") for f in found}
        if not created:
            raise FileNotFoundError(f"no refresh versions under {store}")
        version = max(created, key=created.get)
    vdir = OutputFolder(_join(store, version), storage_options)
    pointer = vdir.read_json("_CURRENT.json")
    if pointer is None:
        raise FileNotFoundError(f"{store}/{version} has no _CURRENT.json: no refresh has finished there yet")
    t = pa.concat_tables([pq.read_table(vdir.path(f), filesystem=vdir.fs) for f in pointer["files"]])
    return t if include_deleted else t.filter(pc.invert(t.column("deleted")))
