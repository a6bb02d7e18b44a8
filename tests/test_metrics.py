"""Job metrics: a no-op without Ray, and counters on a real head's Prometheus endpoint that match the rows written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import free_ports, write_manifest

from igpt_batch.run import metrics
from igpt_batch.run.storage import OutputFolder, read_output

BIN = Path(sys.executable).parent


def test_errors_by_stage_counts_the_errors_table():
    t = pa.table({"id": ["a", "b", "c"], "uri": ["x", "y", "z"], "stage": ["read", "decode", "decode"],
                  "error": ["", "", ""]})
    assert metrics.errors_by_stage({"embeddings": pa.table({"id": []}), "errors": t}) == {"read": 1, "decode": 2}
    assert metrics.errors_by_stage({"samples": t}) == {}


def test_no_op_and_no_ray_import_without_ray():
    code = ("import sys; from igpt_batch import metrics as m, executors, worker\n"
            "m.shard(m.job_tags('extract', 's3://u:pw@b/o'), 'committed'); m.actors({}, 1, 0)\n"
            "m.shard_committed('extract', 'o', {'rows': {'embeddings': 2}, 'stats': {'model_s': 1.0}}, {})\n"
            "assert 'ray' not in sys.modules and m._metrics is None, sorted(k for k in sys.modules if 'ray' in k)\n"
            "assert m.job_tags('extract', 's3://u:pw@b/o') == {'task': 'extract', 'job': 's3://b/o'}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def metrics_head(tmp_path_factory):
    """`ray start --head --block` with a metrics export port, in its own process group; stopped by PID (killpg)."""
    tmp = tmp_path_factory.mktemp("metricshead")
    ray_tmp = tempfile.mkdtemp(prefix="igpt-ray-", dir="/tmp")  # unix socket paths must stay short
    port, mport, *ports = free_ports(8)  # distinct: each held until all are chosen
    # every port of its own, so no other Ray on the machine (the session's ray_local) meets this one
    own = [f"--{flag}={p}" for flag, p in zip(("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
           "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port"), ports)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--metrics-export-port={mport}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}",
         '--system-config={"metrics_report_interval_ms": 1000}', *own],  # export every second, not every 10
        env=env, stdout=open(tmp / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{mport}/metrics"
    try:
        deadline = time.time() + 90
        while scrape(url) is None:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray head did not come up: " + (tmp / "head.log").read_text()[-2000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


def values(text: str | None, name: str, job: str, by: str) -> dict[str, float]:
    """{label `by`: value summed over workers} of metric `name` for one job, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counter = Counter()
    for family in text_string_to_metric_families(text or ""):
        for s in family.samples:
            if s.name == name and s.labels.get("job") == job:
                out[s.labels.get(by, "")] += s.value
    return dict(out)


def test_job_counters_on_the_prometheus_endpoint_match_the_rows_written(metrics_head, tiny_ckpt, image_dir, tmp_path):
    address, url, env = metrics_head
    uris = sorted(str(p) for p in image_dir.iterdir()) + [str(image_dir / "missing.png")]  # 2 undecodable, 1 unread
    manifest = write_manifest(tmp_path / "m.parquet", uris)
    out = str(tmp_path / "out")
    cmd = [str(BIN / "igpt-batch"), "extract", "--model", tiny_ckpt, "--manifest", str(manifest), "--output", out,
           "--shard-size", "2", "--torch-threads", "1", "--address", address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    alive_during = 0.0
    while proc.poll() is None:  # during the job: the pool's workers-alive gauge appears
        time.sleep(0.5)
        alive_during = max(alive_during, values(scrape(url), "ray_igpt_actors", out, "state").get("alive", 0.0))
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(stdout.splitlines()[-1])  # the one-line JSON summary, last on stdout

    n_shards = len(OutputFolder(out).committed())
    errors = read_output(out, "errors").column("stage").to_pylist()
    want = {"ray_igpt_rows_done_total": {"embeddings": read_output(out, "embeddings").num_rows},
            "ray_igpt_rows_failed_total": dict(Counter(errors)), "ray_igpt_shards_total": {"committed": n_shards}}
    assert want["ray_igpt_rows_failed_total"] == {"read": 1, "decode": 2} and summary["errors"] == 3
    by = {"ray_igpt_rows_done_total": "kind", "ray_igpt_rows_failed_total": "stage", "ray_igpt_shards_total": "outcome"}
    deadline = time.time() + 30  # the metrics agent exports what the workers sent, a few seconds late
    while True:
        text = scrape(url)
        got = {name: values(text, name, out, label) for name, label in by.items()}
        if got == want or time.time() > deadline:
            break
        time.sleep(0.5)
    assert got == want
    seconds = values(text, "ray_igpt_stage_seconds_total", out, "stage")
    assert set(seconds) >= {"read", "model", "write"} and seconds["model"] > 0, seconds
    assert values(text, "ray_igpt_shard_seconds_count", out, "task") == {"extract": n_shards}
    assert alive_during == 1, "the workers-alive gauge was never scraped while the job ran"
