#!/usr/bin/env python
"""What a refresh night costs the store: the Lance commit of the changed rows beside today's full rewrite.

A synthetic store of N rows (random `--dim`-float embeddings) is built as a Lance current table and as the Parquet
current table the previous design rewrote each night. A night then changes, adds and deletes a fraction of the
rows (0%, 0.1%, 1%): `lance` commits them with the refresh code's own Store (one merge_insert, tag, retention),
`rewrite` reads the whole previous table and writes the next one (what the old merge did). Each is measured in a
fresh process: wall time, bytes written to the store, and peak RSS. The embeddings of the changed rows are given
(the model's time is the same either way and is not what this bench measures).

    python bench/bench_refresh_night.py                    # 1,000,000 rows, dim 1024
    python bench/bench_refresh_night.py --smoke            # 20,000 rows, dim 64 (seconds)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

V, SNAP0, SNAP1 = "v-000000000000", "20200101T000000Z", "20200102T000000Z"


def table(ids, dim: int, snap: str, seed: int):
    import numpy as np
    import pyarrow as pa

    from igpt_batch.store.layout import current_schema

    n, rng = len(ids), np.random.default_rng(seed)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * dim, dtype=np.float32)), dim)
    return pa.table({"id": ids, "uri": [f"s3://bucket/images/{i}.jpg" for i in ids], "sha256": [f"{hash(i):064x}"[-64:] for i in ids],
                     "size": pa.array(np.full(n, 100_000), pa.int64()), "mtime": ["2020-01-01T00:00:00+00:00"] * n,
                     "etag": [f"{i}-etag" for i in ids], "embedding": emb, "width": pa.array(np.full(n, 256), pa.int32()),
                     "height": pa.array(np.full(n, 256), pa.int32()), "snapshot": [snap] * n,
                     "deleted": pa.array(np.zeros(n, bool))}).cast(current_schema(dim, {"version": V}))


def setup(rows: int, dim: int, d: Path) -> None:
    import lance
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igpt_batch.store.layout import Store

    store = Store(str(d / "store"))
    store.create_version(V, {})
    ids = [f"img-{i:09d}" for i in range(rows)]
    (d / "parquet").mkdir()
    for s in range(0, rows, 100_000):  # written in parts, as the old design did (100,000 rows a part)
        t = table(ids[s:s + 100_000], dim, SNAP0, s)
        pq.write_table(t, d / "parquet" / f"part-{s // 100_000:05d}.parquet", compression="zstd")
        if s == 0:
            ds = store.commit(V, SNAP0, pa.RecordBatchReader.from_batches(t.schema, t.to_batches()))
        else:
            ds = lance.write_dataset(t, store.table_url(V), mode="append")
    store.publish(V, SNAP0, ds.version)
    store.prune(V, 3, 0)  # setup's appends are one night


def changes(rows: int, frac: float, dim: int):
    """The night's rows to upsert (changed + new, with their embeddings) and ids to delete (frac each third)."""
    k = max(int(rows * frac / 3), 1) if frac else 0
    changed = [f"img-{i:09d}" for i in range(0, rows, max(rows // max(k, 1), 1))][:k]
    new = [f"new-{i:09d}" for i in range(k)]
    gone = [f"img-{i:09d}" for i in range(1, rows, max(rows // max(k, 1), 1))][:k]
    return table(changed + new, dim, SNAP1, 7), gone


def written_since(p: Path, t: float) -> int:
    """Bytes of the files under p written at or after wall-clock time t."""
    return sum(st.st_size for f in p.rglob("*") if f.is_file() and (st := f.stat()).st_mtime >= t)


def night_lance(d: Path, rows: int, frac: float, dim: int) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from igpt_batch.store.layout import Store

    upsert, gone = changes(rows, frac, dim)
    since, t0 = time.time() - 0.01, time.perf_counter()
    store = Store(str(d / "store"))
    marks = store.read(V, filter=pc.field("id").isin(gone)) if gone else upsert.schema.empty_table()
    marks = marks.set_column(marks.schema.get_field_index("deleted"), "deleted", pa.array([True] * marks.num_rows))
    t = pa.concat_tables([upsert, marks.cast(upsert.schema)])
    if t.num_rows:
        ds = store.commit(V, SNAP1, pa.RecordBatchReader.from_batches(t.schema, t.to_batches()))
        store.publish(V, SNAP1, ds.version)
        store.prune(V, 3, 32)
    return {"wall_s": time.perf_counter() - t0, "written": written_since(d / "store", since), "changed_rows": t.num_rows,
            "changed_bytes": t.nbytes}


def night_rewrite(d: Path, rows: int, frac: float, dim: int) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    upsert, gone = changes(rows, frac, dim)
    if not upsert.num_rows:
        return {"wall_s": 0.0, "written": 0, "changed_rows": 0, "changed_bytes": 0}  # the old code wrote nothing either
    out, t0 = d / "parquet-next", time.perf_counter()
    out.mkdir()
    drop = pa.concat_arrays([upsert.column("id").combine_chunks(), pa.array(gone, pa.string())])
    for i, f in enumerate(sorted((d / "parquet").iterdir())):  # read and rewrite every part, as the old merge did
        t = pq.read_table(f)
        t = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=drop)))
        pq.write_table(t, out / f"part-{i:05d}.parquet", compression="zstd")
    pq.write_table(upsert, out / "part-tonight.parquet", compression="zstd")
    return {"wall_s": time.perf_counter() - t0, "written": written_since(out, 0), "changed_rows": upsert.num_rows + len(gone),
            "changed_bytes": upsert.nbytes}


def child(kind: str, d: Path, rows: int, frac: float, dim: int) -> None:
    r = (night_lance if kind == "lance" else night_rewrite)(d, rows, frac, dim)
    r["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


def run(rows: int, dim: int, fracs: list[float]) -> list[dict]:
    results = []
    for frac in fracs:
        with tempfile.TemporaryDirectory(prefix="igpt-night-") as tmp:
            me = [sys.executable, __file__]
            subprocess.run([*me, "--setup", str(rows), str(dim), tmp], check=True)
            for kind in ("lance", "rewrite"):
                out = subprocess.run([*me, "--child", kind, tmp, str(rows), str(frac), str(dim)], check=True,
                                     capture_output=True, text=True).stdout
                results.append({"kind": kind, "frac": frac, **json.loads(out.strip().splitlines()[-1])})
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--fracs", type=float, nargs="+", default=[0.0, 0.001, 0.01])
    p.add_argument("--smoke", action="store_true", help="20,000 rows, dim 64, 0.1%% changed")
    p.add_argument("--setup", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.setup:
        return setup(int(args.setup[0]), int(args.setup[1]), Path(args.setup[2]))
    if args.child:
        k, d, rows, frac, dim = args.child
        return child(k, Path(d), int(rows), float(frac), int(dim))
    rows, dim, fracs = (20_000, 64, [0.001]) if args.smoke else (args.rows, args.dim, args.fracs)
    results = run(rows, dim, fracs)
    for r in results:
        ratio = r["written"] / r["changed_bytes"] if r["changed_bytes"] else 0.0
        print(f"rows {rows} dim {dim} changed {r['frac']:.1%} {r['kind']}: wall {r['wall_s']:.2f} s, written "
              f"{r['written'] / 2**20:.1f} MiB ({ratio:.1f}x the changed rows), peak RSS {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
