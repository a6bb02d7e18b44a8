"""A job's `_plan/` files hold raw manifest rows (fetchable URLs with credentials): they go when the job ends, succeeded
or failed; a killed run's are swept by the next run, which re-reads the user's manifest for the URLs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from igpt_batch.run.storage import Folder, OutputFolder

REPO = Path(__file__).resolve().parent.parent
SECRET = "hunter2-plan"


def extract(ckpt, manifest, url, so, tmp_path, max_error_fraction: float) -> subprocess.Popen:
    cfg = tmp_path / f"c{max_error_fraction}.yaml"
    cfg.write_text(f"input: {{retries: 0, read_timeout: 5}}\nrun: {{shard_size: 1, max_error_fraction: "
                   f"{max_error_fraction}, torch_threads: 1}}\n")
    return subprocess.Popen([sys.executable, "-m", "igpt_batch.cli", "extract", "--model", ckpt, "--manifest",
                             str(manifest), "--output", url, "--executor", "local", "--config", str(cfg),
                             "--storage-options", json.dumps(so)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def holds_secret(url: str, so: dict) -> list[str]:
    f = Folder(url, so)
    f.fs.invalidate_cache()  # another process wrote: no listing of ours is current
    return [p for p in f.fs.find(f.root) if SECRET.encode() in f.fs.cat_file(p)]


def plan_parts(out: OutputFolder) -> list[str]:
    return [p for p in out.fs.find(out.path("_plan")) if p.endswith(".parquet")]  # (SeaweedFS keeps a folder entry)


def test_plan_files_go_when_a_job_ends_killed_failed_or_succeeded(tiny_ckpt, output_url, tmp_path):
    url, so = output_url
    uris = [f"http://user:{SECRET}@127.0.0.1:9/img{i}.jpg" for i in range(40)]  # refused at once: error rows
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(40)], "uri": uris}), manifest)
    out = OutputFolder(url, so)
    # killed mid-job: its plan files (raw rows, the password in clear) are left behind
    killed = extract(tiny_ckpt, manifest, url, so, tmp_path, 1.0)
    deadline = time.time() + 300
    while killed.poll() is None and time.time() < deadline and not (out.exists("_commits") and out.markers()[0]):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert holds_secret(url, so), "the killed run left no plan file: the test did not kill it mid-job"
    # the next run sweeps them, re-reads the manifest for the uncommitted shards, and fails (every row an error)
    failed = extract(tiny_ckpt, manifest, url, so, tmp_path, 0.0)
    _, err = failed.communicate(timeout=600)
    assert failed.returncode == 1 and "over run.max_error_fraction" in err, err
    assert holds_secret(url, so) == []
    assert out.status()[0] == "failed" and not plan_parts(out)
    assert sum(rec["rows"]["errors"] for rec in out.committed().values()) == 40  # every row, each once
    # a successful rerun leaves none either
    ok = extract(tiny_ckpt, manifest, url, so, tmp_path, 1.0)
    _, err = ok.communicate(timeout=600)
    assert ok.returncode == 0 and holds_secret(url, so) == [], err
    assert out.status()[0] == "succeeded" and not plan_parts(out)
