"""Sources' size, mtime and ETag without reading their bytes: one listing per folder or prefix (os.scandir on local
disk, one LIST on an object store), a HEAD (or os.stat) only for rows whose prefix was not listed."""
from __future__ import annotations

import datetime as dt
import email.utils
import os
import posixpath
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.inputs.fetch import _with_deadline
from igpt_batch.uris import local_path

THREADS = 16  # concurrent HEADs and listings
LIST_MIN = 4  # a prefix holding at least this many rows is listed once instead of stat-ed row by row
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
STAT_SCHEMA = pa.schema([("size", pa.int64()), ("mtime", pa.string()), ("etag", pa.string())])


def prefix_of(uris: pa.Array) -> pa.Array:
    """Each uri's folder or prefix (as stat_table groups them), vectorised: "" for a uri with no slash."""
    folder = pc.replace_substring_regex(uris, r"/[^/]*$", "")
    return pc.if_else(pc.match_substring(uris, "/"), folder, "")


def is_web(uris: pa.Array) -> pa.Array:
    """http(s) uris: never listed, always one HEAD each."""
    return pc.match_substring_regex(uris, "^https?://", ignore_case=True)


def timestamp(value) -> str | None:
    """A modification time as every backend records it: UTC ISO 8601 with nanoseconds, 2026-12-05T08:00:00.123456789Z.
    From nanoseconds (int, os.stat), a datetime (S3), epoch seconds (float), an ISO string (GCS, Azure) or an HTTP
    date (Last-Modified); None when there is none or it cannot be read (the source is then decided by its bytes)."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                value = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        value = (value - EPOCH) // dt.timedelta(microseconds=1) * 1000
    elif isinstance(value, float):
        value = round(value * 1e9)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    seconds, ns = divmod(value, 10**9)
    return f"{EPOCH + dt.timedelta(seconds=seconds):%Y-%m-%dT%H:%M:%S}.{ns:09d}Z"


def _from_info(info: dict) -> dict:
    """{size, mtime, etag} from an fsspec info or listing entry (the same values either way)."""
    mtime = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "Last-Modified")
                  if info.get(k) is not None), None)
    if isinstance(mtime, (int, float)) and not isinstance(mtime, bool):  # a listing's number is epoch seconds
        mtime = float(mtime)
    etag = info.get("ETag") or info.get("etag")
    return {"size": info.get("size"), "mtime": timestamp(mtime), "etag": None if etag is None else str(etag).strip('"')}


def _fs_for(uri: str, options: dict):
    if uri.split("://", 1)[0].lower() in ("http", "https"):  # as fetch.read_bytes: only headers apply to http(s)
        kw = {"client_kwargs": {"headers": options["headers"]}} if options.get("headers") else {}
        return fsspec.filesystem("http", **kw), uri
    return fsspec.core.url_to_fs(uri, **options)


def stat_one(uri: str, options: dict, timeout: float) -> dict | None:
    """{size, mtime, etag} of one source without reading its bytes (a HEAD); None when the store cannot say."""
    try:
        path = local_path(uri)
        if path is not None:
            st = os.stat(path)
            return {"size": st.st_size, "mtime": timestamp(st.st_mtime_ns), "etag": None}
        fs, path = _fs_for(uri, options)
        fs.invalidate_cache(path)  # object stores cache listings; tonight's answer must be fresh
        return _from_info(_with_deadline(lambda: fs.info(path), timeout, uri))
    except Exception:  # missing, denied, timed out: decided by reading (and the worker records the error)
        return None


def _listing(prefix: str, wanted: set[str], options: dict, timeout: float) -> dict[str, dict]:
    """Basename -> stat of the `wanted` entries of one folder or prefix: os.scandir locally, one LIST on object
    stores. Only wanted entries are kept, so memory follows the bucket's rows, not the folder's size."""
    try:
        path = local_path(prefix)
        if path is not None:
            with os.scandir(path or ".") as it:
                return {e.name: _entry_stat(e) for e in it if e.name in wanted}
        fs, path = _fs_for(prefix, options)
        fs.invalidate_cache(path)
        found = _with_deadline(lambda: fs.ls(path, detail=True), timeout, prefix)
        return {name: _from_info(i) for i in found
                if i.get("type") != "directory" and (name := posixpath.basename(i["name"].rstrip("/"))) in wanted}
    except Exception:
        return {}


def _entry_stat(entry: os.DirEntry) -> dict | None:
    try:
        st = entry.stat()
        return {"size": st.st_size, "mtime": timestamp(st.st_mtime_ns), "etag": None}
    except OSError:
        return None


def _basename(uri: str) -> str:
    path = local_path(uri)
    return os.path.basename(path) if path is not None else uri.rsplit("/", 1)[-1]


def stat_table(uris: pa.Array, options: dict, timeout: float) -> tuple[pa.Table, Counter]:
    """size, mtime, etag of every uri (nulls where the store cannot say): prefixes shared by LIST_MIN rows or more
    are listed once, the other rows are stat-ed one by one (http(s) always). Also counts lists and HEADs."""
    uris = uris.cast(pa.string())
    prefixes = pc.if_else(is_web(uris), pa.scalar(None, pa.string()), prefix_of(uris)).to_pylist()
    uris = uris.to_pylist()
    by_prefix = defaultdict(list)
    for i, p in enumerate(prefixes):
        by_prefix[p].append(i)
    del prefixes
    listed = [p for p, rows in by_prefix.items() if p is not None and len(rows) >= LIST_MIN]
    head = [i for p, rows in by_prefix.items() if p is None or len(rows) < LIST_MIN for i in rows]
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


