#!/usr/bin/env python
"""Refresh planning cost on the driver: wall time and peak RSS of a night over a Lance store of N rows, all unchanged.

Peak RSS is the driver's: with `--executor ray` (the default) every round (split, stat, decide: see
igpt_batch/store/plan_tasks.py) runs in Ray workers, and the driver lists the manifest, reads its Parquet footers and
the table's fragment list, and sums the counts the tasks return.
Each size gets a real store (a current table of N rows with 64-float embeddings, real files behind every uri,
1,000 to a folder: hard links, so every stat is a real os.stat) and one `refresh()` night in a fresh process, which plans, finds
nothing to embed and stops. Memory per row is the slope of peak RSS between the two sizes, so imports and
fixed costs cancel out.

    python bench/bench_refresh_plan.py                     # 1,000,000 and 10,000,000 rows (about N min)
    python bench/bench_refresh_plan.py --rows 200000 1000000
    python bench/bench_refresh_plan.py --smoke             # 2,000 and 6,000 rows in buckets of 1,000 (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SNAP = "20200101T000000Z"
LINKS_PER_FILE = 60_000  # below ext4's 65,000 hard links per inode
PER_FOLDER = 1_000  # image files per folder: each folder is one listing
CHUNK = 1_000_000  # rows generated at a time, so setting up 10M rows fits in memory
MTIME_NS = 1_700_000_000_000_000_000


def job_config(d: Path, bucket_rows: int | None = None, executor: str = "local"):
    from igpt_batch import config

    extra = {"refresh.plan_bucket_rows": bucket_rows} if bucket_rows else {}
    return config.load(None, {"model.name": "demo", "extract.layers": [2], "refresh.store": str(d / "store"),
                              "input.manifest": str(d / "m.parquet"), "run.executor": executor, **extra})


def chunks(rows: int, d: Path):
    """(ids, uris) of the rows, CHUNK at a time."""
    for lo in range(0, rows, CHUNK):
        r = range(lo, min(rows, lo + CHUNK))
        yield [f"img-{i:09d}" for i in r], [str(d / "img" / f"{i // PER_FOLDER:06d}" / f"{i:09d}.jpg") for i in r]


def setup(rows: int, d: Path) -> None:
    """A manifest of `rows` unique files, PER_FOLDER to a folder, and the store a previous night left for it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igpt_batch.inputs.stat import timestamp
    from igpt_batch.model import checkpoint
    from igpt_batch.store.layout import Store, current_schema
    from igpt_batch.store.refresh import version_of

    for k in range(rows // LINKS_PER_FILE + 1):
        src = d / f"source{k}.jpg"
        src.write_bytes(b"x" * 1000)
        os.utime(src, ns=(MTIME_NS, MTIME_NS))
    for f in range(-(-rows // PER_FOLDER)):
        (d / "img" / f"{f:06d}").mkdir(parents=True)
    schema = current_schema(64)
    with pq.ParquetWriter(d / "m.parquet", pa.schema([("id", pa.string()), ("uri", pa.string())])) as manifest:
        def batches():
            for ids, uris in chunks(rows, d):
                start = int(ids[0][4:])
                for i, u in enumerate(uris):
                    os.link(d / f"source{(start + i) // LINKS_PER_FILE}.jpg", u)
                manifest.write_table(pa.table({"id": ids, "uri": uris}))
                n = len(ids)
                emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 64, np.float32)), 64)
                yield from pa.table({"id": ids, "uri": uris, "sha256": [f"{start + i:064x}" for i in range(n)],
                                     "size": [1000] * n, "mtime": [timestamp(MTIME_NS)] * n, "etag": pa.nulls(n, pa.string()),
                                     "embedding": emb, "width": pa.array([32] * n, pa.int32()),
                                     "height": pa.array([32] * n, pa.int32()), "snapshot": [SNAP] * n,
                                     "deleted": [False] * n}).cast(schema).to_batches()

        cfg = job_config(d)
        version, _ = version_of(cfg, checkpoint.read_info(cfg.model.name))
        store = Store(str(d / "store"))
        store.create_version(version, {})
        ds = store.commit(version, SNAP, pa.RecordBatchReader.from_batches(schema, batches()))
    store.publish(version, SNAP, ds.version)


def measure(d: Path, bucket_rows: int | None, executor: str) -> None:
    from igpt_batch.store.refresh import refresh

    cfg = job_config(d, bucket_rows, executor)
    t0 = time.perf_counter()
    summary = refresh(cfg)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_mib": peak_mib, "unchanged": summary["unchanged"], "stat": summary["stat"],
                      "computed": summary["computed"], "precheck": summary["precheck"]}))


def run(rows: int, bucket_rows: int | None, executor: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="igpt-plan-") as tmp:
        d = Path(tmp)
        me = [sys.executable, __file__]
        subprocess.run([*me, "--setup", str(rows), str(d)], check=True)
        buckets = ["--bucket-rows", str(bucket_rows)] if bucket_rows else []
        out = subprocess.run([*me, "--measure", str(d), "--executor", executor, *buckets], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    if (result["unchanged"], result["computed"]) != (rows, 0):
        raise SystemExit(f"expected {rows} unchanged rows and nothing computed, got {result}")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs=2, default=[1_000_000, 10_000_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--smoke", action="store_true", help="2,000 and 6,000 rows, planned 1,000 rows to a bucket")
    p.add_argument("--bucket-rows", type=int, help="refresh.plan_bucket_rows (default: the config's, 250,000)")
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray (default): the bucket rounds run as Ray tasks on a local Ray, as in production; "
                        "local: one after another in the driver process")
    p.add_argument("--setup", nargs=2, metavar=("ROWS", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.setup:
        return setup(int(args.setup[0]), Path(args.setup[1]))
    if args.measure:
        return measure(Path(args.measure), args.bucket_rows, args.executor)
    small, large = (2_000, 6_000) if args.smoke else args.rows
    bucket_rows = 1_000 if args.smoke and not args.bucket_rows else args.bucket_rows
    results = {rows: run(rows, bucket_rows, args.executor) for rows in (small, large)}
    for rows, r in results.items():
        print(f"rows {rows}: planning {r['wall_s']:.1f} s, {rows / r['wall_s']:.0f} rows/s, peak RSS {r['peak_mib']:.0f} MiB, "
              f"precheck {r['precheck']}, {-(-rows // PER_FOLDER)} folders, {r['stat']['lists']} lists, "
              f"{r['stat']['heads']} heads")
    per_row = (results[large]["peak_mib"] - results[small]["peak_mib"]) * 2**20 / (large - small)
    print(f"bytes_per_row: {per_row:.0f}")


if __name__ == "__main__":
    main()
