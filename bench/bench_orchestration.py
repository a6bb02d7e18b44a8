#!/usr/bin/env python
"""Orchestration cost of a job: the driver's object-store requests, planning and summary seconds, and peak RSS.

An `extract` job runs through the real driver (igpt_batch.run.driver.run_job) on the Ray executor, reading a Parquet
manifest with the images inside it (--bytes-column) and writing to SeaweedFS behind bench/latency_proxy.py, which
adds --latency-ms to every request and attributes each connection to its process. The model is a stand-in that
sleeps batch/rate seconds per batch (a GPU's time) and emits zero embeddings of the real schema; each shard's
first --bad-per-shard rows are not images, so every shard has error rows (the summary's error path runs).

The driver is its own process, started after the data is set up, so its requests, peak RSS and phases are its own:
planning = run_job's start until the executor starts; running = the executor; summary = after the executor until
run_job returns (summary, pictures, _SUCCESS, lease release). Busy = the stand-in's sleep per actor. ray_init_s is
the executor's wait for Ray (the driver starts it in the background during a scan of 65,536 rows or more);
first_commit_s counts from the executor's start, first_commit_from_start_s from run_job's.

    python bench/bench_orchestration.py --shards 200 --latency-ms 25
    python bench/bench_orchestration.py --shards 4 --rows-per-shard 32 --latency-ms 5 --rate 100000   # seconds
    python bench/bench_orchestration.py --shards 2000 --check   # exits 1 when the driver's target is missed
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from igpt_batch.run.tasks import Extract  # noqa: E402

BUCKET = "bench"
IMAGE_COLUMN = "image"
PNG = b"\x89PNG\r\n\x1a\n"


class StandIn(Extract):
    """extract with a stand-in model: `rate` images/s per actor, one batch at a time under the model lock."""

    def __init__(self, rate: float, batch: int):
        self.rate, self.batch = rate, batch

    def runner(self, ctx):
        return StandInRunner(ctx, self.rate, self.batch)


class StandInRunner:
    def __init__(self, ctx, rate: float, batch: int):
        resolved = ctx.resolved
        self.lock, self.meta, self.rate, self.batch = ctx.model_lock, resolved.meta, rate, batch
        self.dim = len(resolved.layers) * resolved.info.n_embd

    def __call__(self, shard, rows, stats) -> dict:
        import hashlib

        import numpy as np
        import pyarrow as pa

        from igpt_batch.errors import ImageError
        from igpt_batch.model.extractor import embedding_array
        from igpt_batch.run.tasks.base import error_row, error_table

        ids, uris, data = (rows.column(c).to_pylist() for c in ("id", "uri", "bytes"))
        good = [j for j, b in enumerate(data) if b.startswith(PNG)]
        for lo in range(0, len(good), self.batch):
            with self.lock:  # one "GPU" per actor: two shards in flight take turns
                t0 = time.perf_counter()
                time.sleep(len(good[lo:lo + self.batch]) / self.rate)
                stats.model_s += time.perf_counter() - t0
        bad = sorted(set(range(len(ids))) - set(good))
        errors = [error_row(ids[j], uris[j], ImageError("decode", "not an image")) for j in bad]
        table = pa.table({
            "id": pa.array([ids[j] for j in good], pa.string()), "uri": pa.array([uris[j] for j in good], pa.string()),
            "embedding": embedding_array(np.zeros((len(good), self.dim), np.float32)),
            "width": pa.array([8] * len(good), pa.int32()), "height": pa.array([8] * len(good), pa.int32()),
            "sha256": pa.array([hashlib.sha256(data[j]).hexdigest() for j in good], pa.string()),
        }).replace_schema_metadata(self.meta)
        return {"embeddings": table, "errors": error_table(errors)}


def tiny_png() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def setup(fs, shards: int, rows_per_shard: int, bad_per_shard: int) -> str:
    """The manifest on S3: id and the image's bytes; the first bad_per_shard rows of every shard are not images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, png = shards * rows_per_shard, tiny_png()
    images = [b"not an image" if i % rows_per_shard < bad_per_shard else png for i in range(rows)]
    table = pa.table({"id": [f"img-{i:09d}" for i in range(rows)], IMAGE_COLUMN: pa.array(images, pa.binary())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=65_536)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    path = f"{BUCKET}/manifest-{shards}x{rows_per_shard}.parquet"
    fs.pipe_file(path, sink.getvalue().to_pybytes())
    return f"s3://{path}"


def measure(spec: dict) -> None:
    """The driver process: one run_job, the executor timed from outside (no hook in the package)."""
    from latency_proxy import fetch_stats

    from igpt_batch import config
    from igpt_batch.run import driver, executors

    cfg = config.load(None, {
        "model.name": "demo", "extract.layers": [2], "input.manifest": spec["manifest"],
        "input.bytes_column": IMAGE_COLUMN, "output.path": spec["output"], "storage_options": spec["so"],
        "run.shard_size": spec["rows_per_shard"], "run.workers": spec["actors"], "run.torch_threads": 1,
        "run.cpus_per_worker": min(1.0, (os.cpu_count() or 2) / spec["actors"]), "output.preview": 0,
        "run.address": spec["ray_address"], "output.format": spec.get("format", "parquet")})
    marks, workers, execute, init_ray = {}, set(), executors.execute, executors.init_ray

    def timed_init(address):
        t = time.perf_counter()
        try:
            return init_ray(address)
        finally:
            marks["ray_init_s"] = time.perf_counter() - t

    def timed(job, shards, done):
        def seen(rec: dict) -> None:
            workers.add(rec["worker_pid"])
            marks.setdefault("first_commit", time.perf_counter())
            done(rec)

        marks["execute_start"], marks["stats_planned"] = time.perf_counter(), fetch_stats(spec["proxy"])
        marks["rss_planned"] = peak_rss_mib()
        try:
            return execute(job, shards, seen)
        finally:
            marks["execute_end"], marks["stats_ran"] = time.perf_counter(), fetch_stats(spec["proxy"])
            marks["rss_ran"] = peak_rss_mib()

    executors.execute, executors.init_ray = timed, timed_init
    if hasattr(driver, "execute"):  # should the driver come to import it at the top
        driver.execute = timed
    t0 = time.perf_counter()
    summary = driver.run_job(cfg, StandIn(spec["rate"], spec["batch"]))
    t1 = time.perf_counter()
    if "execute_end" not in marks:
        raise SystemExit("the bench did not see the executor run: the driver no longer calls "
                         "igpt_batch.run.executors.execute, so planning and summary cannot be told apart")
    print(json.dumps({"pid": os.getpid(), "wall_s": t1 - t0, "planning_s": marks["execute_start"] - t0,
                      "running_s": marks["execute_end"] - marks["execute_start"], "summary_s": t1 - marks["execute_end"],
                      "ray_init_s": marks.get("ray_init_s", 0.0),
                      "first_commit_s": marks.get("first_commit", marks["execute_end"]) - marks["execute_start"],
                      "first_commit_from_start_s": marks.get("first_commit", marks["execute_end"]) - t0,
                      "peak_rss_mib": peak_rss_mib(), "peak_rss_planned_mib": marks["rss_planned"],
                      "peak_rss_ran_mib": marks["rss_ran"],
                      "workers": sorted(workers), "summary": summary,
                      "stats_planned": marks["stats_planned"], "stats_ran": marks["stats_ran"]}))


def peak_rss_mib() -> float:
    """This process's peak resident set so far: VmHWM, which starts afresh at exec. Not getrusage's ru_maxrss,
    which keeps the high-water mark of the process that started this one (the bench, holding the manifest it
    built: that is the 833 MiB once recorded as the driver's peak at 1M rows)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def start_proxy(upstream: str, latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "latency_proxy.py"), "--upstream", upstream,
                             "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("port: "):
        proc.kill()
        raise SystemExit(f"the latency proxy did not start (rc {proc.wait()})")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def run(args, endpoint: str, key: str, secret: str) -> dict:
    """Set up the manifest (straight to SeaweedFS), then run the driver process against the proxy; its figures."""
    import s3fs
    from latency_proxy import by_kind, fetch_stats

    direct = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}
    manifest = setup(s3fs.S3FileSystem(skip_instance_cache=True, **direct), args.shards, args.rows_per_shard,
                     args.bad_per_shard)
    proxy, url = start_proxy(endpoint, args.latency_ms)
    try:
        spec = {"manifest": manifest, "output": f"s3://{BUCKET}/out-{time.time_ns()}", "proxy": url,
                "so": direct | {"client_kwargs": {"endpoint_url": url}}, "rows_per_shard": args.rows_per_shard,
                "actors": args.actors, "rate": args.rate, "batch": args.batch, "ray_address": args.ray_address,
                "format": args.output_format}
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a shared one
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run([sys.executable, __file__, "--measure"], input=json.dumps(spec), capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"the driver process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        final = fetch_stats(url)
    finally:
        proxy.terminate()
        proxy.wait(30)
    driver, workers = {r["pid"]}, set(r["workers"])
    r["requests"] = {"driver": by_kind(final, driver), "worker": by_kind(final, workers),
                     "other": by_kind(final, {p for p, _, _ in final["requests"]} - driver - workers)}
    phases = [by_kind(r["stats_planned"], driver), by_kind(r["stats_ran"], driver), r["requests"]["driver"]]
    r["driver_phases"] = {"planning": phases[0], "running": phases[1] - phases[0], "summary": phases[2] - phases[1]}
    r["connections"] = final["connections"]
    return r


def report(args, r: dict) -> bool:
    """Print the figures as `name: value` lines; True when the driver's request target is met."""
    def say(name: str, value) -> None:
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)

    s = r["summary"]
    busy = s["stage_seconds"].get("model_s", 0.0) / args.actors  # the stand-in's sleep, per actor
    for name, value in [("shards", s["shards"]), ("rows", s["input_rows"]), ("error_rows", s["errors"]),
                        ("actors", args.actors), ("latency_ms", args.latency_ms), ("rate_per_actor", args.rate),
                        ("wall_s", r["wall_s"]), ("planning_s", r["planning_s"]), ("running_s", r["running_s"]),
                        ("ray_init_s", r["ray_init_s"]), ("first_commit_s", r["first_commit_s"]),
                        ("first_commit_from_start_s", r["first_commit_from_start_s"]),
                        ("summary_s", r["summary_s"]), ("driver_peak_rss_mib", r["peak_rss_mib"]),
                        ("driver_peak_rss_planning_mib", r["peak_rss_planned_mib"]),
                        ("driver_peak_rss_running_mib", r["peak_rss_ran_mib"]),
                        ("standin_busy_s", busy), ("busy_fraction", busy / r["wall_s"]),
                        ("running_busy_fraction", busy / r["running_s"]), ("worker_processes", len(r["workers"]))]:
        say(name, value)
    for role, counts in r["requests"].items():
        say(f"requests_{role}", sum(counts.values()))
        for kind, n in sorted(counts.items()):
            say(f"requests {role} {kind}", n)
    for phase, counts in r["driver_phases"].items():
        say(f"driver_requests_{phase}", sum(counts.values()))
    driver, target = sum(r["requests"]["driver"].values()), 100 + s["shards"] / 50
    say("driver_requests_per_shard", driver / s["shards"])
    say("driver_requests_target", f"{driver} <= {target:g} (100 + shards/50): {'met' if driver <= target else 'missed'}")
    return driver <= target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=200)
    p.add_argument("--rows-per-shard", type=int, default=1024)
    p.add_argument("--latency-ms", type=float, default=25.0, help="added by the proxy to every request")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (each 2/actors CPUs of a 2-core machine)")
    p.add_argument("--rate", type=float, default=2000.0, help="the stand-in's images/s per actor")
    p.add_argument("--batch", type=int, default=256, help="the stand-in's batch: it sleeps batch/rate per batch")
    p.add_argument("--bad-per-shard", type=int, default=1, help="rows per shard that are not images (error rows)")
    p.add_argument("--endpoint", help="an S3 endpoint already running (keys from $S3_KEY, $S3_SECRET); "
                                      "default: start SeaweedFS (weed mini) for the run")
    p.add_argument("--ray-address", help="join this Ray cluster (default: the driver starts its own local Ray)")
    p.add_argument("--output-format", default="parquet", choices=["parquet", "lance"], help="output.format")
    p.add_argument("--check", action="store_true", help="exit 1 when the driver's request target is missed")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return measure(json.loads(sys.stdin.read()))
    if args.endpoint:
        r = run(args, args.endpoint, os.environ["S3_KEY"], os.environ["S3_SECRET"])
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import S3Server  # the SeaweedFS the tests use

        with tempfile.TemporaryDirectory(prefix="igpt-orch-") as tmp:
            server = S3Server(Path(tmp))
            server.start()
            try:
                r = run(args, server.endpoint, server.key, server.secret)
            finally:
                server.stop()
    if not report(args, r) and args.check:
        sys.exit(1)


if __name__ == "__main__":
    main()
