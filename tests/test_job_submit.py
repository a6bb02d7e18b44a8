"""A real `ray job submit` of jobs/generate.py and jobs/extract.py against a head started by the test."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, free_ports, write_manifest

from igpt_batch.run.storage import read_output

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own process group; stopped by PID (killpg), never by name."""
    tmp = tmp_path_factory.mktemp("rayhead")
    # Ray's unix sockets live under --temp-dir and must stay under 107 bytes: keep that path short
    ray_tmp = tempfile.mkdtemp(prefix="igpt-ray-", dir="/tmp")
    port, dash, *ports = free_ports(9)  # distinct: each held until all are chosen
    # Every port of its own: the session's local Ray (ray_local) already holds Ray's default agent ports,
    # and a head whose job agent cannot bind answers every submit with "No available agent".
    agent_ports = [f"--{flag}={p}" for flag, p in zip(("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
                   "ray-client-server-port"), ports)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true", f"--temp-dir={ray_tmp}", *agent_ports],
        env=env, stdout=open(tmp / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None:
            raise RuntimeError((tmp / "head.log").read_text()[-2000:])
        time.sleep(1)
    else:
        raise RuntimeError("ray head did not come up: " + (tmp / "head.log").read_text()[-2000:])
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)  # the head can take ~20 s to honour SIGTERM; its process group is ours to kill
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def submit(address, env, entrypoint: list[str]) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", sys.executable, *entrypoint]
    deadline = time.time() + 90
    while True:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        # a fresh head answers before its job agent is up: Ray says to try again later
        if "No available agent to submit job" not in r.stderr + r.stdout or time.time() > deadline:
            return r
        time.sleep(2)


def test_ray_job_submit_generate_and_extract(ray_head, tiny_ckpt, image_dir, tmp_path):
    address, env = ray_head
    r = submit(address, env, ["jobs/generate.py", "--model", tiny_ckpt, "--output", str(tmp_path / "gen"),
                              "--num-samples", "5", "--shard-size", "2", "--workers", "2", "--cpus-per-worker", "0.5"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    t = read_output(str(tmp_path / "gen"), "samples")
    assert sorted(t.column("seed").to_pylist()) == [0, 1, 2, 3, 4]
    manifest = write_manifest(tmp_path / "m.parquet", [str(image_dir / "astronaut.jpg"), str(image_dir / "text.jpg")])
    r = submit(address, env, ["jobs/extract.py", "--model", tiny_ckpt, "--manifest", str(manifest),
                              "--output", str(tmp_path / "ext"), "--layer", "1"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_output(str(tmp_path / "ext"), "embeddings").num_rows == 1
    assert read_output(str(tmp_path / "ext"), "errors").num_rows == 1
    # a bad flag fails the job with a message naming it, and the job is reported as failed
    r = submit(address, env, ["jobs/generate.py", "--model", tiny_ckpt, "--output", str(tmp_path / "bad"), "--top-p", "7"])
    assert r.returncode != 0 and "top_p" in (r.stdout + r.stderr)
