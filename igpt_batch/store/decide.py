"""What one hash bucket of a night decides (Bucket, Counts): each manifest row, already stat-ed, against the previous
row of its id: new, changed (other bytes), unchanged (by ETag, size and mtime, or the same sha256), gone.

Uris are compared as image_key(uri): redacted (the store keeps no credential) and, for a presigned URL, without its
signing parameters, so a re-signed URL or a new password is the same image, not a move."""
from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch import errors
from igpt_batch.config import JobConfig
from igpt_batch.inputs import fetch
from igpt_batch.inputs.stat import STAT_SCHEMA, THREADS
from igpt_batch.redact import redact_uri

TOUCH = ("id", "uri", "size", "mtime", "etag")  # a metadata update: these columns of an unchanged row
# query parameters of presigned URLs that change on every signing (S3, GCS, Azure SAS, CloudFront), dropped from a
# uri's image_key when the uri carries a credential
SIGNING = re.compile(r"^(x-amz-.*|x-goog-.*|se|st|sv|sp|spr|sr|srt|ss|sig|skoid|sktid|skt|ske|sks|skv|expires|"
                     r"signature|key-pair-id|policy)$", re.IGNORECASE)


def image_key(uri: str) -> str:
    """A uri as the identity of its image: redacted, and without the signing parameters of a presigned URL."""
    r = redact_uri(uri)
    base, q, query = r.partition("?")
    if not q or "=***" not in query:
        return r
    query, hash_, fragment = query.partition("#")
    kept = [p for p in query.split("&") if not p.endswith("=***") and not SIGNING.match(p.partition("=")[0])]
    return base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment


def redacted(uris: pa.Array, key: bool = False) -> pa.Array:
    """redact_uri (or image_key) of each uri, vectorised: only uris with '@', '?' or '#' are looked at."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    todo = np.flatnonzero(as_mask(pc.match_substring_regex(uris, "[@?#]|[^ -~]")))
    if not len(todo):
        return uris
    fn = image_key if key else redact_uri
    out = uris.to_pylist()
    for i in todo.tolist():
        out[i] = fn(out[i])
    return pa.array(out, pa.string())


@dataclass
class Counts:
    """What a night decided, summed over its buckets; the last four are the metadata pre-check's."""

    manifest_rows: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    revived: int = 0
    failed_unchanged: int = 0
    previous_rows: int = 0
    previous_deleted: int = 0
    etag: int = 0  # unchanged by ETag
    size_mtime: int = 0  # unchanged by size and mtime
    hashed: int = 0  # read and sha256'd
    hash_unchanged: int = 0  # of those, the same bytes

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def precheck(self) -> dict:
        """The summary's `precheck`: the pre-check's non-zero counts (`hashed` always)."""
        names = ("etag", "size_mtime", "hashed", "hash_unchanged")
        return {k: getattr(self, k) for k in names if getattr(self, k) or k == "hashed"}


@dataclass
class Bucket:
    """What one hash bucket of ids decided (its rows to compute travel apart: see decide and decide_bucket)."""

    counts: Counts
    touch: pa.Table  # TOUCH columns of unchanged rows whose metadata moved (or that come back from deleted)
    gone: pa.Table  # id, deleted of previous rows that left the manifest
    failed: pa.Table  # the failed-rows record's entries for ids in the manifest


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


def same_source(key: pa.Array, st: pa.Table, was: pa.Table, nulls_equal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(by_etag, by_size_mtime): rows whose metadata says the bytes are those recorded in `was` (when both sides
    have an ETag, it alone decides); `key` is the rows' image_key. With nulls_equal, a source that could not be
    stat-ed then or now is the same."""
    eq = (lambda a, b: ~differs(a, b)) if nulls_equal else (lambda a, b: as_mask(pc.equal(a, b)))
    same_uri = as_mask(pc.equal(key, redacted(was.column("uri"), key=True)))
    both_etag = as_mask(pc.not_equal(was.column("etag"), "")) & as_mask(pc.not_equal(st.column("etag"), ""))
    by_etag = same_uri & both_etag & eq(was.column("etag"), st.column("etag"))
    by_size_mtime = same_uri & ~both_etag & eq(was.column("size"), st.column("size")) & eq(was.column("mtime"), st.column("mtime"))
    return by_etag, by_size_mtime


def decide(man: pa.Table, prev: pa.Table, failed: pa.Table, cfg: JobConfig, pending: str | None) -> tuple[Bucket, pa.Table]:
    """One bucket of a night: its manifest rows, already stat-ed (id, uri, size, mtime, etag: before any bytes
    are read; a sha256 where the manifest holds the image), decided against the previous row of each id. Returns
    the bucket and its rows to compute (every column of `man`, uris as given: they are fetched)."""
    ids, uris = man.column("id").combine_chunks(), man.column("uri").combine_chunks()
    key, safe = redacted(uris, key=True), redacted(uris)
    content = man.column("sha256") if "sha256" in man.column_names else pa.nulls(len(ids), pa.string())
    inside = as_mask(pc.is_valid(content))  # the manifest holds the image: its sha256 alone decides
    st = man.select(STAT_SCHEMA.names)
    at = pc.index_in(ids, value_set=prev.column("id"))  # row in prev, null for a new id
    was = prev.select(["uri", *STAT_SCHEMA.names, "deleted"]).take(at)
    known = as_mask(pc.is_valid(at))
    by_etag, by_size_mtime = (known & ~inside & m for m in same_source(key, st, was))
    to_hash = np.flatnonzero(known & ~by_etag & ~by_size_mtime)
    fetch_at = [i for i in to_hash.tolist() if not inside[i]]
    fetched = dict(zip(fetch_at, _threads(lambda u: sha_of(u, cfg), uris.take(pa.array(fetch_at, pa.int64())).to_pylist())))
    shas = [fetched[i] if i in fetched else content[i].as_py() for i in to_hash.tolist()]
    old = prev.column("sha256").take(at.take(to_hash)).to_pylist()
    same_bytes = np.array([sha is not None and sha == o for sha, o in zip(shas, old)], dtype=bool)
    unchanged = by_etag | by_size_mtime
    unchanged[to_hash[same_bytes]] = True
    changed = np.zeros(len(ids), dtype=bool)
    changed[to_hash[~same_bytes]] = True  # different bytes, or unreadable now (the extract run records why)
    skip = _failed_unchanged(ids, key, content, st, failed, pending, cfg) & ~unchanged
    moved = as_mask(was.column("deleted")) | differs(key, redacted(was.column("uri"), key=True))
    for c in STAT_SCHEMA.names:
        moved |= differs(st.column(c), was.column(c))
    compute = (~known | changed) & ~skip
    stat = pa.table({"id": ids, "uri": safe, **{c: st.column(c) for c in STAT_SCHEMA.names}})
    gone = prev.filter(pc.invert(pc.is_in(prev.column("id"), value_set=ids))).select(["id", "deleted"])
    counts = Counts(manifest_rows=len(ids), new=int((~known & ~skip).sum()), changed=int((changed & ~skip).sum()),
                    unchanged=int(unchanged.sum()), revived=int((unchanged & as_mask(was.column("deleted"))).sum()),
                    failed_unchanged=int(skip.sum()), previous_rows=prev.num_rows,
                    previous_deleted=int(as_mask(prev.column("deleted")).sum()), etag=int(by_etag.sum()),
                    size_mtime=int(by_size_mtime.sum()), hashed=len(fetch_at), hash_unchanged=int(same_bytes.sum()))
    bucket = Bucket(counts, stat.filter(pa.array(unchanged & moved)), gone,
                    failed.filter(pc.is_in(failed.column("id"), value_set=ids)))
    return bucket, man.filter(pa.array(compute))


def _failed_unchanged(ids, key, content, st: pa.Table, failed: pa.Table, pending: str | None, cfg: JobConfig) -> np.ndarray:
    """Rows that failed before and whose source has not changed since (by its metadata, or its sha256 when the
    manifest holds the image): not retried (unless --retry-errors). One that failed in the night being resumed is,
    as that night's first attempt did."""
    if cfg.refresh.retry_errors:
        return np.zeros(len(ids), dtype=bool)
    fat = pc.index_in(ids, value_set=failed.column("id"))
    fwas = failed.select(["uri", "sha256", *STAT_SCHEMA.names, "last_night"]).take(fat)
    f_etag, f_size_mtime = same_source(key, st, fwas, nulls_equal=True)
    inside = as_mask(pc.is_valid(content))
    same = np.where(inside, as_mask(pc.equal(content, fwas.column("sha256"))) & as_mask(pc.equal(key, redacted(fwas.column("uri"), key=True))),
                    f_etag | f_size_mtime)
    return as_mask(pc.is_valid(fat)) & same & as_mask(pc.not_equal(fwas.column("last_night"), pending or ""))
