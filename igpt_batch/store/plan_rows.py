"""A night plan's rows: the schemas of the rows planning reads and writes, and the hashes that bucket them."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.config import JobConfig
from igpt_batch.inputs.stat import STAT_SCHEMA, is_web, prefix_of, stat_table
from igpt_batch.store.decide import as_mask
from igpt_batch.store.layout import SOURCE, current_schema

META = (*(name for name, _ in SOURCE), "deleted")  # the current table's columns planning reads
# a manifest row as planning reads it: `row` its order key (inputs/units.py: in manifest order, not dense); `sha256`
# the content of an image inside the manifest (a bytes column, a tar member: hashed while planning, never held), null
# for a uri to stat; `member` a tar member
PLANNED = pa.schema([("id", pa.string()), ("uri", pa.string()), ("row", pa.int64()), ("sha256", pa.string()),
                     ("member", pa.string())])
STATED = pa.schema([*PLANNED, *STAT_SCHEMA])  # stat files


def planned(key: int, t: pa.Table) -> pa.Table:
    """Manifest rows (id, uri and a bytes or member column as read) as PLANNED, the first one's order key `key`:
    images inside the manifest are hashed here, and their bytes dropped."""
    n, cols = t.num_rows, t.column_names
    if "bytes" in cols:
        sha = pa.array([None if b is None else hashlib.sha256(b).hexdigest() for b in t.column("bytes").to_pylist()],
                       pa.string())
    else:
        sha = t.column("sha256") if "sha256" in cols else pa.nulls(n, pa.string())
    return pa.table({"id": t.column("id"), "uri": t.column("uri"), "row": pa.array(np.arange(key, key + n)),
                     "sha256": sha, "member": t.column("member") if "member" in cols else pa.nulls(n, pa.string())},
                    schema=PLANNED)


def empty_meta() -> pa.Table:
    return current_schema(1).empty_table().select(list(META))


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


def stat_bucket_of(t: pa.Table, n: int) -> np.ndarray:
    """A manifest row's stat bucket: the hash of its folder or prefix, so each is listed by one task; by id for
    http(s) rows, which are never listed."""
    uris = t.column("uri")
    return np.where(as_mask(is_web(uris)), bucket_of(t.column("id"), n), bucket_of(prefix_of(uris), n))


def stat_rows(t: pa.Table, cfg: JobConfig) -> tuple[pa.Table, Counter]:
    """stat_table of the rows whose content is not known already (null sha256); the others get null stats."""
    need = as_mask(pc.is_null(t.column("sha256")))
    if need.all():
        return stat_table(t.column("uri").combine_chunks(), cfg.storage_options, cfg.input.read_timeout)
    st, io = stat_table(t.column("uri").filter(pa.array(need)).combine_chunks(), cfg.storage_options,
                        cfg.input.read_timeout)
    at = pa.array(np.cumsum(need) - 1, mask=~need)
    return st.take(at), io
