"""Bytes a refresh night's commit reads from the current table, with the BTREE on id (issue 20, contract 4).

    python bench/bench_refresh_commit.py --rows 3000000 --dim 64 --changed 0.001

Builds a store's current table of --rows rows (the real schema, small random embeddings) through Store.commit, builds
its scalar indices (store/index.update_index), then runs one night's commit as refresh does it: the old rows of the
metadata updates and deletion marks read by id (refresh._updated), merge_insert on id of the changed rows (half
updated, half new), the tag, and the live count. The bytes read are the process's rchar (every read syscall, page
cache hits included), which matches Lance's own io_stats for the same calls. The same merge without the index
(use_index=False, a hash join over the id column) is measured on the same table for comparison. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igpt_batch.store.index import update_index  # noqa: E402
from igpt_batch.store.layout import LIVE, Store, current_schema  # noqa: E402
from igpt_batch.store.refresh import _updated  # noqa: E402

V = "v-bench0000000"
BATCH = 100_000


def rchar() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])


def rows(schema: pa.Schema, ids: np.ndarray, snap: str, seed: int) -> pa.RecordBatch:
    n, dim = len(ids), schema.field("embedding").type.list_size
    sid = pa.array([f"img/{i:010d}" for i in ids])
    emb = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return pa.record_batch({
        "id": sid, "uri": pc.binary_join_element_wise("s3://bucket/", sid, ".jpg", ""),
        "sha256": pa.array([f"{i:064x}" for i in ids]), "size": pa.array(ids * 7 + 1000),
        "mtime": pa.array(["2026-11-01T00:00:00Z"] * n), "etag": pa.nulls(n, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), dim), "width": pa.array(np.full(n, 640, np.int32)),
        "height": pa.array(np.full(n, 480, np.int32)), "snapshot": pa.array([snap] * n),
        "deleted": pa.array(np.zeros(n, bool))}, schema=schema)


def reader(schema, ids: np.ndarray, snap: str) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(schema, (rows(schema, ids[s:s + BATCH], snap, s) for s in
                                                      range(0, len(ids), BATCH)))


def table_bytes(store: Store) -> int:
    root = Path(store.table_url(V)) / "data"
    return sum(p.stat().st_size for p in root.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--changed", type=float, default=0.001, help="fraction of the table changed tonight")
    ap.add_argument("--touched", type=float, default=0.0001, help="fraction with a metadata update or deletion mark")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-commit-"))
    store, schema = Store(str(work / "store")), current_schema(a.dim, {"version": V})
    store.create_version(V, {})
    t0 = time.time()
    store.publish(V, "20260101T000000Z", store.commit(V, "20260101T000000Z", reader(schema, np.arange(a.rows), "n1")).version)
    build_s = time.time() - t0
    t0 = time.time()
    update_index(store, V, min_rows=10 * a.rows)  # the scalar indices only
    index_s, total, indexed = time.time() - t0, table_bytes(store), store.open(V).version
    rng = np.random.default_rng(1)
    n = max(2, int(a.rows * a.changed))
    upd = np.sort(rng.choice(a.rows, n // 2, replace=False))
    changed = np.concatenate([upd, np.arange(a.rows, a.rows + n - n // 2)])
    touched = np.setdiff1d(rng.choice(a.rows, max(1, int(a.rows * a.touched)), replace=False), upd)
    touch = pa.table({"id": pa.array([f"img/{i:010d}" for i in touched]), "uri": pa.array(["s3://moved/x.jpg"] * len(touched)),
                      "size": pa.array(np.ones(len(touched), np.int64)), "mtime": pa.array(["2"] * len(touched)),
                      "etag": pa.nulls(len(touched), pa.string()), "deleted": pa.array(np.zeros(len(touched), bool))})
    r0, t0 = rchar(), time.time()
    ds = store.open(V)
    old = _updated(ds, touch, schema)  # the metadata updates, looked up by id
    night = pa.concat_tables([pa.Table.from_batches([rows(schema, changed, "n2", 7)]), old])
    new = store.commit(V, "20260102T000000Z", pa.RecordBatchReader.from_batches(schema, night.to_batches()))
    store.publish(V, "20260102T000000Z", new.version)
    live = store.open(V).count_rows(LIVE)
    commit_b, commit_s = rchar() - r0, time.time() - t0
    r0, t0 = rchar(), time.time()
    update_index(store, V, min_rows=10 * a.rows)  # tonight's rows into the scalar indices
    upkeep_b, upkeep_s = rchar() - r0, time.time() - t0
    ds, src = store.open(V, indexed), pa.Table.from_batches([rows(schema, changed, "n2", 7)])  # night 1, indexed
    base = {}
    for use in (True, False):
        r0, t0 = rchar(), time.time()
        ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().use_index(use).execute_uncommitted(src)
        base[use] = (rchar() - r0, time.time() - t0)
    print(json.dumps({
        "rows": a.rows, "dim": a.dim, "changed": len(changed), "touched": len(touched), "live_after": live,
        "table_bytes": total, "build_s": round(build_s, 1), "scalar_index_s": round(index_s, 1),
        "commit_read_bytes": commit_b, "commit_read_fraction": round(commit_b / total, 4), "commit_s": round(commit_s, 2),
        "index_upkeep_read_bytes": upkeep_b, "index_upkeep_fraction": round(upkeep_b / total, 4),
        "index_upkeep_s": round(upkeep_s, 2),
        "merge_only_with_index": {"read_bytes": base[True][0], "s": round(base[True][1], 2)},
        "merge_only_scan_join": {"read_bytes": base[False][0], "s": round(base[False][1], 2)},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
