"""One writer, really: two real processes racing for the lease (local disk and SeaweedFS), a job that loses its lease
commits nothing more, and --overwrite never takes a live lease."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igpt_batch import config
from igpt_batch.errors import JobError
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import LEASE, Folder, OutputFolder

REPO = Path(__file__).resolve().parent.parent

# A starter that pauses right after its first read of the lease until every starter has read it: the interleaving
# that let two starters pass a read-write-read-back lease. The patch sits under any lease code (the fs reads).
STARTER = r"""
import json, os, sys, time
import fsspec.implementations.local as local, s3fs
from igpt_batch.run.storage import Folder, Lease
url, so, me, n, d = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
first = [True]
def barrier():
    if first[0]:
        first[0] = False
        open(os.path.join(d, "read-" + me), "w").close()
        while sum(f.startswith("read-") for f in os.listdir(d)) < n:
            time.sleep(0.01)
cat = local.LocalFileSystem.cat_file
def cat_file(self, path, *a, **k):
    try:
        return cat(self, path, *a, **k)
    finally:
        if str(path).endswith("_LEASE.json"):
            barrier()
local.LocalFileSystem.cat_file = cat_file
call = s3fs.S3FileSystem._call_s3
async def _call_s3(self, method, *a, **k):
    try:
        return await call(self, method, *a, **k)
    finally:
        if method == "get_object" and k.get("Key", "").endswith("_LEASE.json"):
            barrier()
s3fs.S3FileSystem._call_s3 = _call_s3
try:
    with Lease(Folder(url, so), 600) as lease:
        print("TOOK", lease.generation, flush=True)
        while not os.path.exists(os.path.join(d, "release")):
            time.sleep(0.02)
except Exception as e:
    print("REFUSED", type(e).__name__, e, flush=True)
"""


def race(url: str, so: dict, d: Path, n: int = 2) -> list[str]:
    """n starters released together after each read the lease once; returns each one's verdict line."""
    d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, url, json.dumps(so), str(i), str(n), str(d)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(n)]
    lines = [p.stdout.readline().strip() for p in procs]  # each decides (took or refused) before anyone releases
    (d / "release").touch()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    return lines


def test_interleaved_starters_cannot_both_take_the_lease(output_url, tmp_path):
    url, so = output_url
    Folder(url, so).write_bytes("keep.txt", b"x")  # the folder exists
    lines = race(url, so, tmp_path / "r1")
    assert sorted(line.split()[0] for line in lines) == ["REFUSED", "TOOK"], lines
    assert any("is in use by another job" in line and f"host {socket.gethostname()}" in line for line in lines), lines
    assert not Folder(url, so).exists(LEASE)  # the winner released it


def test_interleaved_takeovers_of_a_stale_lease_cannot_both_pass(output_url, tmp_path):
    url, so = output_url
    stale = {"host": "elsewhere", "pid": 1, "token": "old", "generation": 7, "started_at": 0, "refreshed_at": 0}
    Folder(url, so).write_json(LEASE, stale)
    lines = race(url, so, tmp_path / "r2")
    assert sorted(line.split()[0] for line in lines) == ["REFUSED", "TOOK"], lines
    assert "TOOK 8" in lines  # the takeover is a new generation of the fencing token


def cfg_for(ckpt, out, so=None, **over):
    return config.load(None, {"model.name": ckpt, "output.path": str(out), "run.executor": "local", "run.shard_size": 1,
                              "output.contact_sheet": 0, "generate.num_samples": 4, "run.torch_threads": 1,
                              **({"storage_options": so} if so else {}), **over})


def test_overwrite_against_a_live_lease_is_refused_naming_the_holder(tiny_ckpt, output_url, tmp_path):
    url, so = output_url
    run_job(cfg_for(tiny_ckpt, url, so), "generate")
    holder = subprocess.Popen([sys.executable, "-c", STARTER, url, json.dumps(so), "0", "1", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().startswith("TOOK")
        with pytest.raises(JobError, match=rf"in use by another job \(host {socket.gethostname()}, pid {holder.pid}"):
            run_job(cfg_for(tiny_ckpt, url, so, **{"output.overwrite": True, "generate.num_samples": 2}), "generate")
        assert read_output(url, "samples", so).num_rows == 4  # nothing of the running job was removed
        assert OutputFolder(url, so).status()[0] == "succeeded"
    finally:
        (tmp_path / "release").touch()
        holder.wait(60)


JOB = r"""
import json, sys
from igpt_batch.cli import main
sys.exit(main(["generate", "--model", sys.argv[1], "--output", sys.argv[2], "--executor", "local",
               "--storage-options", sys.argv[3], "--config", sys.argv[4]]))
"""


def test_a_job_that_lost_its_lease_commits_nothing_more_and_exits_1(tiny_ckpt, output_url, tmp_path):
    """A's driver is stopped past run.lease_timeout; B takes the stale lease over and finishes; A, resumed, finds its
    lease gone: exit 1 with a message, no _SUCCESS of its own, and the output holds each sample once."""
    url, so = output_url
    (tmp_path / "c.yaml").write_text("run: {lease_timeout: 4, shard_size: 1, torch_threads: 1}\n"
                                     "generate: {num_samples: 40}\noutput: {contact_sheet: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", JOB, tiny_ckpt, url, json.dumps(so), str(tmp_path / "c.yaml")]
    a = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = OutputFolder(url, so)
    try:
        deadline = time.time() + 300
        while not (out.exists("_commits") and out.markers()[0]) and a.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert a.poll() is None, a.stderr.read()
        token_a = out.read_json(LEASE)["token"]
        os.kill(a.pid, signal.SIGSTOP)
        while time.time() - out.read_json(LEASE)["refreshed_at"] <= 4:  # A's lease goes stale
            time.sleep(0.2)
        b = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)  # waits out the stale lease
        assert b.returncode == 0, b.stderr
    finally:
        os.kill(a.pid, signal.SIGCONT)
    _, err_a = a.communicate(timeout=300)
    assert a.returncode == 1, err_a
    assert "lost the lease on" in err_a and "wrote no _SUCCESS" in err_a, err_a
    status, summary = out.status()
    assert status == "succeeded" and summary["shards"] == 40
    assert sorted(read_output(url, "samples", so).column("seed").to_pylist()) == list(range(40))
    records = out.committed().values()
    assert all(r["v"] == 2 and r["started_at"] <= r["ended_at"] and r["errors_by_reason"] == {} for r in records)
    tokens = {rec["lease"]["token"] for rec in records}
    assert len(tokens) == 2 and token_a in tokens  # A's commits before it stopped, B's after
