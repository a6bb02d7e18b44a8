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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import fsspec
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


def _precheck(prev: dict, st: dict | None) -> str | None:
    """How metadata alone proves the source is unchanged: 'etag', 'size_mtime', or None (read the bytes)."""
    if st is None:
        return None
    if prev["etag"] and st["etag"]:
        return "etag" if prev["etag"] == st["etag"] else None
    if st["size"] is not None and st["mtime"] is not None and (prev["size"], prev["mtime"]) == (st["size"], st["mtime"]):
        return "size_mtime"
    return None


def _sha(uri: str, cfg: JobConfig) -> str | None:
    try:
        data = images.read_bytes(uri, cfg.storage_options, timeout=cfg.input.read_timeout, max_bytes=cfg.input.max_bytes)
    except images.ImageError:
        return None
    return hashlib.sha256(data).hexdigest()


def _pmap(fn, items: list) -> list:
    """fn over items in a bounded thread pool, a chunk at a time (millions of rows never make millions of futures)."""
    out: list = []
    with ThreadPoolExecutor(THREADS, thread_name_prefix="igpt-refresh") as pool:
        for s in range(0, len(items), 4096):
            out += pool.map(fn, items[s:s + 4096])
    return out


def _read_prev(vdir: OutputFolder, pointer: dict | None) -> tuple[dict[str, int], dict[str, list]]:
    """The previous current table's planning columns (no embeddings): id -> row index, and the columns."""
    if not pointer:
        return {}, {c: [] for c in META}
    t = pa.concat_tables([pq.read_table(vdir.path(f), columns=list(META), filesystem=vdir.fs) for f in pointer["files"]])
    cols = {c: t.column(c).to_pylist() for c in META}
    return {k: j for j, k in enumerate(cols["id"])}, cols


def _snapshot_id(vdir: OutputFolder, pointer: dict | None) -> str:
    """A new snapshot id that sorts by time after the previous one and names nothing that exists yet."""
    t = _now()
    while True:
        sid = t.strftime("%Y%m%dT%H%M%SZ")
        if (not pointer or sid > pointer["snapshot"]) and not vdir.exists(f"snapshots/{sid}") and not vdir.exists(f"current/{sid}"):
            return sid
        t += dt.timedelta(seconds=1)


def _prune_current(vdir: OutputFolder, live: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` current/<snapshot>/ tables (never the live one); returns their ids.
    Nothing computed is lost: every embedding in them also lives in its night's snapshots/<id>/."""
    if keep <= 0:
        return []
    top = vdir.path("current")
    vdir.fs.invalidate_cache(top)  # object stores cache listings
    # tables by their files, not by listing folders: some stores keep an emptied folder as a prefix
    files = retry(lambda: vdir.fs.find(top), "list current/")
    tables = sorted({posixpath.relpath(f, top).split("/", 1)[0] for f in files})
    old = [sid for sid in tables[:-keep] if sid != live]
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
    ids, uris = table.column("id").to_pylist(), table.column("uri").to_pylist()
    pointer = vdir.read_json("_CURRENT.json")
    prev_ix, prev = _read_prev(vdir, pointer)

    # stat every row before any bytes are read: a source that changes after its stat is caught the next night
    stats = _pmap(lambda u: _stat(u, so, cfg.input.read_timeout), uris)
    pre = Counter()
    new, changed, unchanged, to_hash = [], [], [], []
    for i, (id_, uri, st) in enumerate(zip(ids, uris, stats)):
        j = prev_ix.get(id_)
        if j is None:
            new.append(i)
            continue
        how = _precheck({c: prev[c][j] for c in ("size", "mtime", "etag")}, st) if prev["uri"][j] == uri else None
        if how:
            pre[how] += 1
            unchanged.append(i)
        else:
            to_hash.append(i)
    shas = _pmap(lambda i: _sha(uris[i], cfg), to_hash)
    pre["hashed"] = len(to_hash)
    for i, sha in zip(to_hash, shas):
        if sha is not None and sha == prev["sha256"][prev_ix[ids[i]]]:
            pre["hash_unchanged"] += 1
            unchanged.append(i)
        else:
            changed.append(i)  # different bytes, or unreadable now (the extract run records why)
    updates, revived = {}, 0  # id -> fresh uri/size/mtime/etag for unchanged rows whose metadata moved
    for i in unchanged:
        j = prev_ix[ids[i]]
        m = {"uri": uris[i], **(stats[i] or {"size": None, "mtime": None, "etag": None})}
        revived += prev["deleted"][j]
        if prev["deleted"][j] or any(prev[k][j] != v for k, v in m.items()):
            updates[ids[i]] = m
    in_manifest = set(ids)
    gone = [k for k in prev["id"] if k not in in_manifest]
    newly_deleted = [k for k in gone if not prev["deleted"][prev_ix[k]]]
    drop = cfg.refresh.deleted == "drop" and bool(gone)
    compute = sorted(new + changed)  # manifest order
    summary = {"version": version, "snapshot": None, "manifest_rows": len(ids), "new": len(new), "changed": len(changed),
               "unchanged": len(unchanged), "revived": revived, "deleted": len(newly_deleted),
               "dropped": len(gone) if drop else 0, "metadata_updates": len(updates), "computed": len(compute),
               "errors": 0, "current_rows": len(prev["id"]), "live_rows": len(prev["id"]) - sum(prev["deleted"]),
               "precheck": dict(pre), "pruned": []}
    pending = vdir.read_json("_PENDING.json")
    if pending and pointer and pending["snapshot"] <= pointer["snapshot"]:
        pending = None  # that night finished; only its clean-up was lost
    if not compute and not updates and not newly_deleted and not drop:
        summary["message"] = f"nothing to embed: {len(unchanged)} rows unchanged"
        log.info("refresh %s: %s", version, summary["message"])
        if vdir.exists("_PENDING.json"):
            vdir.fs.rm(vdir.path("_PENDING.json"))
        if pointer and (root.read_json("_LATEST.json") or {}).get("version") != version:
            root.write_json("_LATEST.json", {"version": version, "snapshot": pointer["snapshot"], "updated_at": _now().isoformat()})
        return summary

    snap = pending["snapshot"] if pending and compute else _snapshot_id(vdir, pointer)
    summary["snapshot"] = snap
    log.info("refresh %s/%s: %d new, %d changed, %d unchanged, %d deleted -> %d to embed", version, snap, len(new),
             len(changed), len(unchanged), len(newly_deleted), len(compute))
    if not vdir.exists("_version.json"):
        vdir.write_json("_version.json", {**vkeys, "model": cfg.model.name, "n_embd": info.n_embd, "created_at": _now().isoformat()})
    snap_url, emb = _join(vurl, "snapshots", snap), None
    if compute:
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
            emb = emb.filter(pc.is_in(emb.column("id"), pa.array([ids[i] for i in compute], pa.string())))

    # merge: previous rows (metadata refreshed, deletions applied) then the rows embedded tonight
    index = {k: i for i, k in enumerate(ids)}
    done = set(emb.column("id").to_pylist()) if emb is not None and emb.num_rows else set()
    failed = [ids[i] for i in compute if ids[i] not in done]
    dim = len(layers) * info.n_embd
    if emb is not None and emb.schema.metadata:
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

    for f in (pointer or {}).get("files", []):
        t = pq.read_table(vdir.path(f), filesystem=vdir.fs)
        keep = [j for j, k in enumerate(t.column("id").to_pylist()) if k not in done and (k in in_manifest or not drop)]
        if not keep:
            continue
        t = t.take(keep)
        cols = {c: t.column(c).to_pylist() for c in ("id", "uri", "size", "mtime", "etag", "deleted")}
        for j, k in enumerate(cols["id"]):
            for c, v in updates.get(k, {}).items():
                cols[c][j] = v
            cols["deleted"][j] = k not in in_manifest  # a failed recompute keeps its stale row, and its old sha256
        for c in ("uri", "size", "mtime", "etag", "deleted"):
            t = t.set_column(t.schema.get_field_index(c), c, pa.array(cols[c], schema.field(c).type))
        emit(t.select(schema.names))
    if done:
        rows = [stats[index[k]] or {} for k in emb.column("id").to_pylist()]
        emit(pa.table({"id": emb.column("id"), "uri": emb.column("uri"), "sha256": emb.column("sha256"),
                       "size": pa.array([r.get("size") for r in rows], pa.int64()),
                       "mtime": pa.array([r.get("mtime") for r in rows], pa.string()),
                       "etag": pa.array([r.get("etag") for r in rows], pa.string()),
                       "embedding": emb.column("embedding"), "width": emb.column("width"), "height": emb.column("height"),
                       "snapshot": pa.array([snap] * len(rows), pa.string()), "deleted": pa.array([False] * len(rows))}))
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
        summary["computed_ids"] = [ids[i] for i in compute]
        summary["failed_ids"] = failed
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
