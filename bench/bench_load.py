"""Load test: a 100,000-row manifest of small synthetic images through the real CLI and local Ray, demo model, CPU.

Checks the two bounds of the fault-tolerance issue and prints the figures:
  * the driver's peak RSS grows far less than the manifest (planning holds only id/uri columns; shards carry row ranges),
  * the output has exactly N rows in embeddings + errors, every id once.
Usage:  python bench/bench_load.py [--rows 100000] [--workers 2] [--shard-size 5000]
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
import pyarrow.parquet as pq
from PIL import Image

IGPT = str(Path(sys.executable).parent / "igpt-batch")


def make_inputs(root: Path, rows: int, distinct: int = 256, bad_every: int = 1000) -> Path:
    """`distinct` small real PNG files (random 16x16 colour blocks), a broken file, and a manifest of `rows`
    unique ids pointing at them; every `bad_every`-th row points at the broken file or a missing one."""
    rng = np.random.default_rng(0)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    for i in range(distinct):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), np.uint8))).save(img_dir / f"img{i:03d}.png")
    (img_dir / "broken.png").write_bytes(b"\x89PNG broken")
    uris = [str(img_dir / f"img{i % distinct:03d}.png") for i in range(rows)]
    for i in range(0, rows, bad_every):
        uris[i] = str(img_dir / ("broken.png" if (i // bad_every) % 2 else "missing.png"))
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"id": [f"row-{i:07d}" for i in range(rows)], "uri": uris}), manifest)
    return manifest


def run(manifest: Path, out: Path, workers: int, shard_size: int, batch: int) -> tuple[dict, float, float]:
    """Run the CLI; return (summary, wall seconds, driver peak RSS in MiB from /proc VmHWM)."""
    cmd = [IGPT, "extract", "--model", "demo", "--manifest", str(manifest), "--output", str(out), "--layer", "2",
           "--workers", str(workers), "--cpus-per-worker", "1", "--shard-size", str(shard_size), "--batch-size", str(batch),
           "--torch-threads", "1"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0.0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.2)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode})")
    return json.loads(stdout), time.time() - t0, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--small-rows", type=int, default=10_000, help="a smaller manifest, to compare driver RSS")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from igpt_batch.run.readers import read_output

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for rows in (a.small_rows, a.rows):
            root = Path(tmp) / f"n{rows}"
            manifest = make_inputs(root, rows)
            summary, wall, peak = run(manifest, root / "out", a.workers, a.shard_size, a.batch_size)
            emb, err = read_output(str(root / "out"), "embeddings"), read_output(str(root / "out"), "errors")
            ids = emb.column("id").to_pylist() + err.column("id").to_pylist()
            exact = len(ids) == rows and len(set(ids)) == rows
            manifest_mib = pq.read_table(manifest).nbytes / 2**20
            results[rows] = peak
            print(f"rows: {rows}  embeddings: {emb.num_rows}  errors: {err.num_rows}  exactly_once: {exact}")
            print(f"rows_{rows}_wall_s: {wall:.1f}  rows_per_s: {rows / wall:.1f}  driver_peak_rss_mib: {peak:.0f}  "
                  f"manifest_in_memory_mib: {manifest_mib:.1f}  errors_by_reason: {summary['errors_by_reason']}")
            if not exact:
                raise SystemExit("row accounting failed")
        growth = results[a.rows] - results[a.small_rows]
        print(f"driver_rss_growth_mib ({a.small_rows} -> {a.rows} rows): {growth:.0f}")


if __name__ == "__main__":
    main()
