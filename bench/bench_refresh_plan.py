#!/usr/bin/env python
"""Refresh planning cost on the driver: wall time and peak RSS of a night over a Lance store of N rows, all unchanged.

Each size gets a real store (a current table of N rows with 64-float embeddings, real files behind every uri:
hard links, so every stat is a real os.stat) and one `refresh()` night in a fresh process, which plans, finds
nothing to embed and stops. Memory per row is the slope of peak RSS between the two sizes, so imports and
fixed costs cancel out.

    python bench/bench_refresh_plan.py                     # 200,000 and 1,000,000 rows
    python bench/bench_refresh_plan.py --smoke             # 2,000 and 6,000 rows (seconds)
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
MTIME_NS = 1_700_000_000_000_000_000


def job_config(d: Path):
    from igpt_batch import config

    return config.load(None, {"model.name": "demo", "extract.layers": [2], "refresh.store": str(d / "store"),
                              "input.manifest": str(d / "m.parquet"), "run.executor": "local"})


def setup(rows: int, d: Path) -> None:
    """A manifest of `rows` unique files and the store a previous night left for it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igpt_batch import checkpoint
    from igpt_batch.refresh import version_of
    from igpt_batch.store import Store, current_schema

    (d / "img").mkdir(parents=True)
    for k in range(rows // LINKS_PER_FILE + 1):
        src = d / f"source{k}.jpg"
        src.write_bytes(b"x" * 1000)
        os.utime(src, ns=(MTIME_NS, MTIME_NS))
    ids = [f"img-{i:09d}" for i in range(rows)]
    uris = [str(d / "img" / f"{i:09d}.jpg") for i in range(rows)]
    for i, u in enumerate(uris):
        os.link(d / f"source{i // LINKS_PER_FILE}.jpg", u)
    pq.write_table(pa.table({"id": ids, "uri": uris}), d / "m.parquet")
    cfg = job_config(d)
    version, _ = version_of(cfg, checkpoint.read_info(cfg.model.name))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 64, np.float32)), 64)
    t = pa.table({"id": ids, "uri": uris, "sha256": [f"{i:064x}" for i in range(rows)], "size": [1000] * rows,
                  "mtime": [str(MTIME_NS)] * rows, "etag": pa.nulls(rows, pa.string()), "embedding": emb,
                  "width": pa.array([32] * rows, pa.int32()), "height": pa.array([32] * rows, pa.int32()),
                  "snapshot": [SNAP] * rows, "deleted": [False] * rows})
    store = Store(str(d / "store"))
    store.create_version(version, {})
    t = t.cast(current_schema(64))
    ds = store.commit(version, SNAP, pa.RecordBatchReader.from_batches(t.schema, t.to_batches()))
    store.publish(version, SNAP, ds.version)


def measure(d: Path) -> None:
    from igpt_batch.refresh import refresh

    cfg = job_config(d)
    t0 = time.perf_counter()
    summary = refresh(cfg)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_mib": peak_mib, "unchanged": summary["unchanged"], "stat": summary["stat"],
                      "computed": summary["computed"], "precheck": summary["precheck"]}))


def run(rows: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="igpt-plan-") as tmp:
        d = Path(tmp)
        me = [sys.executable, __file__]
        subprocess.run([*me, "--setup", str(rows), str(d)], check=True)
        out = subprocess.run([*me, "--measure", str(d)], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    if (result["unchanged"], result["computed"]) != (rows, 0):
        raise SystemExit(f"expected {rows} unchanged rows and nothing computed, got {result}")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs=2, default=[200_000, 1_000_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--smoke", action="store_true", help="2,000 and 6,000 rows")
    p.add_argument("--setup", nargs=2, metavar=("ROWS", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.setup:
        return setup(int(args.setup[0]), Path(args.setup[1]))
    if args.measure:
        return measure(Path(args.measure))
    small, large = (2_000, 6_000) if args.smoke else args.rows
    results = {rows: run(rows) for rows in (small, large)}
    for rows, r in results.items():
        print(f"rows {rows}: planning {r['wall_s']:.1f} s, {rows / r['wall_s']:.0f} rows/s, peak RSS {r['peak_mib']:.0f} MiB, "
              f"precheck {r['precheck']}")
    per_row = (results[large]["peak_mib"] - results[small]["peak_mib"]) * 2**20 / (large - small)
    print(f"bytes_per_row: {per_row:.0f}")


if __name__ == "__main__":
    main()
