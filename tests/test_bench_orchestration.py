"""bench/bench_orchestration.py at a tiny size: a real extract job through the driver on Ray, to SeaweedFS behind
the latency proxy; the figures it prints agree with the shard count and with each other, and the driver's
object-store requests stay within 100 + shards/50 (issue 20: they do not grow with shards; a count is deterministic)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import S3Server

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_orchestration.py"
SHARDS, ROWS, RATE = 40, 8, 10_000.0


def test_bench_orchestration_smoke(ray_local, s3_server: S3Server):
    address = ray_local.get_runtime_context().gcs_address  # join the session's Ray: starting one costs seconds
    env = os.environ | {"S3_KEY": s3_server.key, "S3_SECRET": s3_server.secret}
    proc = subprocess.run([sys.executable, str(BENCH), "--shards", str(SHARDS), "--rows-per-shard", str(ROWS),
                           "--latency-ms", "5", "--rate", str(RATE), "--actors", "1", "--endpoint", s3_server.endpoint,
                           "--ray-address", address], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(re.findall(r"^([^:\n]+): (.+)$", proc.stdout, re.MULTILINE))
    num = lambda name: float(lines[name])  # noqa: E731
    assert (num("shards"), num("rows"), num("error_rows"), num("worker_processes")) == (SHARDS, SHARDS * ROWS, SHARDS, 1)
    for kind in ("_commits/", "embeddings/", "errors/"):  # every shard: one part of each kind, then its commit marker
        assert num(f"requests worker PUT {kind}") == SHARDS, proc.stdout
    assert "requests driver PUT _SUCCESS" in lines and "requests driver PUT _job.json" in lines
    assert num("requests_other") == 0  # every connection was attributed to the driver or a worker
    # the plan: one file of 40 row groups; the worker lists it once, reads its footer once, then one GET a shard
    assert num("requests driver PUT _plan/") == 1 and "requests worker HEAD _plan/" not in lines, proc.stdout
    assert num("requests worker LIST _plan/") == 1 and num("requests worker GET _plan/") == SHARDS + 1, proc.stdout
    # the summary comes from the commit records in hand: no marker or errors part is read again
    assert not [k for k in lines if k.startswith(("requests driver GET errors/", "requests driver HEAD errors/",
                                                  "requests driver GET _commits/", "requests driver HEAD _commits/"))]
    driver = sum(float(v) for k, v in lines.items() if k.startswith("requests driver "))
    assert num("requests_driver") == driver > 0
    assert sum(num(f"driver_requests_{p}") for p in ("planning", "running", "summary")) == driver
    assert num("driver_requests_per_shard") == float(f"{driver / SHARDS:.4g}")
    assert re.fullmatch(rf"{driver:.0f} <= 100.8 \(100 \+ shards/50\): met", lines["driver_requests_target"])
    assert driver <= 100 + SHARDS / 50
    assert num("standin_busy_s") >= (SHARDS * ROWS - SHARDS) / RATE * 0.999  # it slept for every image
    for name in ("wall_s", "planning_s", "summary_s", "driver_peak_rss_mib"):
        assert num(name) > 0, name
    assert num("planning_s") + num("running_s") + num("summary_s") <= num("wall_s") * 1.001
