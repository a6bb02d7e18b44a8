"""Near-duplicates in a refresh store's current table, without holding the table in one process.

`dedup`: k-NN pairs above a threshold are found in tasks over the table's fragments (Ray tasks with the ray
executor, one after another in this process with the local one: the same code), each writing its pairs as one
Parquet file; the driver reads only the pairs and groups them with one vectorised connected-components pass
(scipy.sparse.csgraph). Its memory grows with the pairs found, not with the table.

`night_duplicates`: one night's new and updated rows searched against the live table (through the vector index when
the table has one, exactly below refresh.index_min_rows); pairs at or above refresh.dup_threshold are kept as the
night's duplicates table (Store.write_duplicates).
"""
from __future__ import annotations

import logging
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.errors import UsageError
from igpt_batch.store.index import QUERY_ROWS, check_k, has_index, knn, open_table
from igpt_batch.store.layout import LIVE, Store

log = logging.getLogger("igpt_batch")
TASK_ROWS = 250_000  # table rows per pair task (whole fragments: a larger fragment is one task)
GROUPS_SCHEMA = pa.schema([("group", pa.int64()), ("id", pa.string()), ("uri", pa.string()),
                           ("group_size", pa.int64()), ("score", pa.float32())])
PAIRS_SCHEMA = pa.schema([("a", pa.uint64()), ("a_id", pa.string()), ("a_uri", pa.string()), ("b", pa.uint64()),
                          ("b_id", pa.string()), ("b_uri", pa.string()), ("score", pa.float32())])
NIGHT_SCHEMA = pa.schema([("id", pa.string()), ("duplicate_of", pa.string()), ("cosine", pa.float32())])
NIGHT_K = 10  # neighbours searched per new or updated row


def dedup(store_url: str, threshold: float = 0.95, output: str | None = None, k: int = 10,
          snapshot: str | None = None, version: str | None = None, storage_options: dict | None = None,
          executor: str = "local", address: str | None = None) -> dict:
    """Groups of live ids whose embeddings have cosine >= threshold (see the module's docstring). Writes them as
    Parquet to `output`: group (numbered by the table position of its first row), id, uri, group_size, score (the
    row's highest cosine to another member)."""
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    check_k(k, 2, " (a row's nearest neighbour is itself)")
    store, version, ds = open_table(store_url, snapshot, version, storage_options)
    scratch = store.scratch_url(version, f"dedup-{uuid.uuid4().hex[:12]}")
    args = [(store.url, storage_options, version, ds.version, frags, k, threshold, scratch) for frags in _tasks(ds)]
    try:
        files = [f for f in _run(executor, address, pair_task, args) if f]
        pairs = _read_pairs(scratch, files, storage_options)
    finally:
        from igpt_batch.run.storage import Folder

        Folder(scratch, storage_options).remove("")
    table = group_pairs(pairs)
    groups = len(np.unique(table.column("group").to_numpy())) if table.num_rows else 0
    summary = {"version": version, "snapshot": snapshot or max(store.kept_snapshots(version)), "index": has_index(ds),
               "threshold": threshold, "k": k, "live_rows": ds.count_rows(LIVE), "pairs": pairs.num_rows,
               "groups": groups, "duplicates": table.num_rows - groups, "output": output}
    if output:
        _write(output, table, storage_options)
    return summary


def _tasks(ds) -> list[list[int]]:
    """The table's fragment ids in table order, grouped into runs of about TASK_ROWS rows."""
    out, rows = [[]], 0
    for f in ds.get_fragments():
        if out[-1] and rows + f.count_rows() > TASK_ROWS:
            out, rows = out + [[]], 0
        out[-1].append(f.fragment_id)
        rows += f.count_rows()
    return [t for t in out if t]


def _run(executor: str, address: str | None, fn, args: list[tuple]) -> list:
    """fn(*a) for every a: Ray tasks with the ray executor, else one after another in this process."""
    if executor == "local":
        return [fn(*a) for a in args]
    import ray

    from igpt_batch.run.cluster import init_ray

    init_ray(address)
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    return ray.get([task.remote(*a) for a in args])


def pair_task(url: str, storage_options: dict | None, version: str, table_version: int, fragments: list[int],
              k: int, threshold: float, scratch: str) -> str | None:
    """The pairs (a, b, cosine >= threshold, a != b) of the live rows of `fragments` and their k nearest live rows of
    the whole table version, as one Parquet file in `scratch`; returns its name (None when there are none)."""
    from igpt_batch.run.storage import Folder

    ds = Store(url, storage_options).open(version, table_version)
    frags = [ds.get_fragment(f) for f in fragments]
    found = []
    scan = ds.scanner(columns=["id", "uri", "embedding"], with_row_address=True, fragments=frags, filter=LIVE,
                      batch_size=QUERY_ROWS)
    for b in scan.to_batches():
        if not b.num_rows:
            continue
        hits = knn(ds, b.column("embedding").values.to_numpy().reshape(b.num_rows, -1), k, ("_rowaddr", "id", "uri"))
        qi = hits.column("query_index").to_numpy()
        score = 1.0 - hits.column("_distance").to_numpy()
        a = b.column("_rowaddr").to_numpy()[qi]
        keep = np.flatnonzero((a != hits.column("_rowaddr").to_numpy()) & (score >= threshold))
        if len(keep):
            src = pa.array(qi[keep])
            found.append(pa.table([a[keep], b.column("id").take(src), b.column("uri").take(src),
                                   hits.column("_rowaddr").take(keep), hits.column("id").take(keep),
                                   hits.column("uri").take(keep), score[keep].astype(np.float32)], schema=PAIRS_SCHEMA))
    if not found:
        return None
    name = f"pairs-{fragments[0]:010d}.parquet"
    Folder(scratch, storage_options).write_table(name, pa.concat_tables(found))
    return name


def _read_pairs(scratch: str, files: list[str], storage_options: dict | None) -> pa.Table:
    from igpt_batch.run.storage import Folder

    folder = Folder(scratch, storage_options)
    return pa.concat_tables([PAIRS_SCHEMA.empty_table()] + [folder.read_table(f) for f in sorted(files)])


def group_pairs(pairs: pa.Table) -> pa.Table:
    """The pairs' rows in connected components (one vectorised pass), one output row per id: group numbered by the
    smallest row address of its members, then rows ordered by id within a group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ends = np.concatenate([pairs.column("a").to_numpy(), pairs.column("b").to_numpy()])
    addr, first, node = np.unique(ends, return_index=True, return_inverse=True)
    n, m = len(addr), pairs.num_rows
    if not n:
        return GROUPS_SCHEMA.empty_table()
    graph = coo_matrix((np.ones(m, np.int8), (node[:m], node[m:])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    _, group_first, group = np.unique(label, return_index=True, return_inverse=True)
    group = np.argsort(np.argsort(group_first))[group]  # numbered in order of their smallest row address
    size = np.bincount(group)[group]
    score = np.full(n, -np.inf, np.float32)
    np.maximum.at(score, node, np.concatenate([pairs.column("score").to_numpy()] * 2))
    ids = pa.concat_arrays([pairs.column("a_id").combine_chunks(), pairs.column("b_id").combine_chunks()]).take(first)
    uris = pa.concat_arrays([pairs.column("a_uri").combine_chunks(), pairs.column("b_uri").combine_chunks()]).take(first)
    order = np.lexsort((np.asarray(ids.to_pylist(), dtype=object).astype(str), group))
    return pa.table({"group": group[order].astype(np.int64), "id": ids.take(order), "uri": uris.take(order),
                     "group_size": size[order].astype(np.int64), "score": score[order]}, schema=GROUPS_SCHEMA)


def _write(path: str, table: pa.Table, storage_options: dict | None) -> None:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        pq.write_table(table, f, compression="zstd")


def night_duplicates(store: Store, version: str, snapshot: str, ids: pa.Array, threshold: float) -> dict:
    """Tonight's rows `ids` searched against the live table: pairs (id, duplicate_of, cosine >= threshold) written
    to the night's duplicates table. Returns the counts for the night's summary; searches nothing without ids."""
    out = {"threshold": threshold, "searched": 0, "pairs": 0, "ids": 0}
    if not len(ids):
        return out
    ds = store.open(version)
    rows = ds.to_table(columns=["id", "embedding"], filter=pc.field("id").isin(ids) & LIVE)  # through the id BTREE
    found = [NIGHT_SCHEMA.empty_table()]
    for s in range(0, rows.num_rows, QUERY_ROWS):
        b = rows.slice(s, QUERY_ROWS)
        hits = knn(ds, b.column("embedding").combine_chunks().values.to_numpy().reshape(b.num_rows, -1), NIGHT_K + 1,
                   ("id",))
        src = b.column("id").take(hits.column("query_index"))
        cos = 1.0 - hits.column("_distance").to_numpy()
        keep = (pc.not_equal(src, hits.column("id")).to_numpy(zero_copy_only=False)) & (cos >= threshold)
        k = pa.array(np.flatnonzero(keep))
        found.append(pa.table([src.take(k), hits.column("id").take(k), cos[keep].astype(np.float32)], schema=NIGHT_SCHEMA))
    pairs = pa.concat_tables(found)
    store.write_duplicates(version, snapshot, pairs)
    return out | {"searched": rows.num_rows, "pairs": pairs.num_rows,
                  "ids": len(pc.unique(pairs.column("id"))), "index": has_index(ds)}
