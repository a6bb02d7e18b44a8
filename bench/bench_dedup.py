"""Driver memory of `dedup` against table rows (issue 20, contract 5: <= 16 bytes a row between 1M and 3M rows).

    python bench/bench_dedup.py --rows 1000000 3000000 [--dup-every 100] [--real-rows 20000]

For each size: a store's table of that many rows (the real schema, 16-d random embeddings; built in a child
process, so the measuring process holds none of it), then `dedup` on the ray executor with its pair tasks over the
table's fragments. At 1M+ rows a k-NN query per row takes hours on 2 cores, so there the tasks are a stand-in that
scans its fragments as the real task does and emits one pair for every --dup-every-th row (a planted duplicate
rate); the driver's side (fragment listing, live count, reading the pairs, connected components, writing groups)
is the real code. --real-rows runs the real k-NN tasks end to end at a size this machine manages.
Prints one JSON line per size: the driver's peak RSS over its RSS before dedup, and the slope between sizes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def status(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024


def build(path: str, rows: int) -> None:
    from bench_refresh_commit import V, reader

    from igpt_batch.store.index import update_index
    from igpt_batch.store.layout import Store, current_schema

    store = Store(path)
    store.create_version(V, {"model": "bench"})
    snap = "20260101T000000Z"
    store.publish(V, snap, store.commit(V, snap, reader(current_schema(16, {"version": V}), np.arange(rows), snap)).version)
    update_index(store, V, 10 * rows)


def standin(every: int):
    def pair_task(url, storage_options, version, table_version, fragments, k, threshold, scratch):
        from igpt_batch.run.storage import Folder
        from igpt_batch.store.dedup import PAIRS_SCHEMA
        from igpt_batch.store.layout import LIVE, Store

        ds = Store(url, storage_options).open(version, table_version)
        scan = ds.scanner(columns=["id", "uri"], with_row_address=True, fragments=[ds.get_fragment(f) for f in fragments],
                          filter=LIVE, batch_size=65536)
        found = []
        for b in scan.to_batches():
            pick = np.flatnonzero(b.column("_rowaddr").to_numpy() % every == 0)
            pick = pick[pick + 1 < b.num_rows]
            a, nxt = pa.array(pick), pa.array(pick + 1)
            found.append(pa.table([b.column("_rowaddr").take(a), b.column("id").take(a), b.column("uri").take(a),
                                   b.column("_rowaddr").take(nxt), b.column("id").take(nxt), b.column("uri").take(nxt),
                                   pa.array(np.full(len(pick), 0.99, np.float32))], schema=PAIRS_SCHEMA))
        name = f"pairs-{fragments[0]:010d}.parquet"
        Folder(scratch, storage_options).write_table(name, pa.concat_tables(found))
        return name

    return pair_task


def measure(path: str, rows: int, every: int | None, executor: str) -> dict:
    import ray

    from igpt_batch.store import dedup as dd

    if every:
        dd.pair_task = standin(every)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        before, t0 = status("VmRSS"), time.time()
        got = dd.dedup(path, 0.98, str(Path(path) / "groups.parquet"), k=5, executor=executor)
        wall, peak = time.time() - t0, status("VmHWM")
    finally:
        ray.shutdown()
    return {"rows": rows, "executor": executor, "stand_in_every": every, "pairs": got["pairs"],
            "groups": got["groups"], "duplicates": got["duplicates"], "wall_s": round(wall, 1),
            "driver_rss_before_mib": round(before / 2**20, 1), "driver_peak_growth_mib": round((peak - before) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--dup-every", type=int, default=100)
    ap.add_argument("--real-rows", type=int, default=0, help="also run the real k-NN tasks at this size")
    ap.add_argument("--one", nargs=4, metavar=("PATH", "ROWS", "EVERY", "EXECUTOR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        path, rows, every, executor = a.one
        print(json.dumps(measure(path, int(rows), int(every) or None, executor)), flush=True)
        return
    results = []
    for rows, every in [(n, a.dup_every) for n in a.rows] + ([(a.real_rows, 0)] if a.real_rows else []):
        path = tempfile.mkdtemp(prefix="bench-dedup-")
        subprocess.run([sys.executable, "-c", f"import bench_dedup; bench_dedup.build({path!r}, {rows})"], check=True,
                       cwd=Path(__file__).parent)
        out = subprocess.run([sys.executable, __file__, "--one", path, str(rows), str(every), "ray"], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        print(out, flush=True)
    stand = [r for r in results if r["stand_in_every"]]
    if len(stand) >= 2:
        lo, hi = stand[0], stand[-1]
        slope = (hi["driver_peak_growth_mib"] - lo["driver_peak_growth_mib"]) * 2**20 / (hi["rows"] - lo["rows"])
        print(json.dumps({"driver_bytes_per_row_between": [lo["rows"], hi["rows"]], "slope": round(slope, 2)}))


if __name__ == "__main__":
    main()
