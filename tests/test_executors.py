"""The Ray executor under real faults: workers that cannot be placed, a local node that dies, a worker node removed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igpt_batch import config
from igpt_batch.errors import JobError
from igpt_batch.run.cluster import check_resources
from igpt_batch.run.driver import run_job
from igpt_batch.run.executors import ActorState
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import OutputFolder

IGPT = str(Path(sys.executable).parent / "igpt-batch")


def test_check_resources_names_what_is_missing():
    nodes = {"a": {"CPU": 2.0}, "b": {"CPU": 1.0, "GPU": 1.0}}
    assert check_resources({"CPU": 1, "GPU": 1}, nodes) is None
    assert check_resources({"CPU": 2, "GPU": 0}, nodes) is None
    msg = check_resources({"CPU": 8, "GPU": 0}, nodes)
    assert "CPU: 8 per worker, at most 2 on any node" in msg
    msg = check_resources({"CPU": 2, "GPU": 1}, nodes)  # each exists, but on no single node together
    assert msg.startswith("the cluster cannot place a worker")
    assert "GPU: 1 per worker, at most 0 on any node" in check_resources({"CPU": 1, "GPU": 1}, {"a": {"CPU": 4.0}})


def test_actor_state_is_placed_once_its_probe_answers():
    state = ActorState(ready="probe-ref", since=5.0)
    assert not state.placed and state.shards == {} and state.node is None
    state.node, state.ready = "node-1", None
    assert state.placed and ActorState("other", 6.0).shards is not state.shards  # no shared default


def test_the_ray_pool_runs_a_job_and_hands_back_each_commit_record(ray_local, tiny_ckpt, tmp_path):
    from igpt_batch.run.driver import prepare
    from igpt_batch.run.executors import execute
    from igpt_batch.run.tasks import get

    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": str(tmp_path / "o"), "generate.num_samples": 5,
                             "run.shard_size": 2, "run.workers": 2, "run.cpus_per_worker": 0.5,
                             "run.torch_threads": 1})
    records = []
    with prepare(cfg, get("generate")) as job:
        assert job.kind is None and job.inputs is None  # generate reads no manifest
        failed = execute(job, job.plan.shards, records.append)
    assert failed == {}
    assert sorted((r["shard"], r["start"], r["stop"]) for r in records) == [
        ("part-00000", 0, 2), ("part-00001", 2, 4), ("part-00002", 4, 5)]
    for r in records:
        assert r["rows"] == {"samples": r["stop"] - r["start"]} and r["http_retries"] == 0
        assert r["stats"]["model_s"] > 0 and r["stats"]["total_s"] >= r["stats"]["model_s"]
    assert sorted(read_output(str(tmp_path / "o"), "samples").column("seed").to_pylist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("flags,missing", [({"run.gpus_per_worker": 1}, "GPU: 1 per worker, at most 0"),
                                           ({"run.cpus_per_worker": 8}, "CPU: 8 per worker, at most 2")])
def test_unplaceable_workers_fail_with_the_missing_resource(ray_local, tiny_ckpt, tmp_path, flags, missing):
    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": str(tmp_path / "o"), "generate.num_samples": 4,
                             "run.shard_size": 2, "output.contact_sheet": 0, "run.actor_start_timeout": 2, **flags})
    t0 = time.monotonic()
    with pytest.raises(JobError, match=missing):
        run_job(cfg, "generate")
    assert time.monotonic() - t0 < 60  # waited out the (3 s) start timeout, not forever
    assert OutputFolder(str(tmp_path / "o")).committed() == {}


def _ray_processes(root: int) -> dict[int, str]:
    """{pid: name} of the raylet and every ray:: process descended from `root` (read from /proc)."""
    parent, name = {}, {}
    for d in Path("/proc").iterdir():
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            name[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except (ValueError, OSError, IndexError):
            continue
    found, frontier = {}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found |= {p: name[p] for p in kids}
        frontier = kids
    return {p: n for p, n in found.items() if n.endswith("/raylet") or n.startswith("ray::")}


def _wait_for_commits(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "_commits").exists() and len(list((out / "_commits").glob("*.json"))) >= n:
            return
        time.sleep(0.05)
    err = proc.communicate(timeout=60)[1] if proc.poll() is not None else ""
    raise AssertionError(f"no {n} commits before the deadline (exit {proc.poll()}): {err[-3000:]}")


KILLS = ("raylet_and_workers", "dashboard_agent")


def test_local_node_loss_ends_the_job_with_a_message_and_a_rerun_resumes(tiny_ckpt, tmp_path):
    """Two jobs at once, each on its own local Ray: one loses its raylet and every ray:: worker together, the other
    its DashboardAgent (the raylet fate-shares with it). Both end with exit 1 and a message; a rerun resumes."""
    cmds, procs = {}, {}
    for kill in KILLS:
        cmds[kill] = [IGPT, "generate", "--model", tiny_ckpt, "--output", str(tmp_path / kill), "--num-samples", "48",
                      "--shard-size", "2", "--batch-size", "2", "--contact-sheet", "0", "--torch-threads", "1"]
        procs[kill] = subprocess.Popen(cmds[kill], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = {}
    try:
        deadline = time.time() + 240
        while len(killed) < len(procs) and time.time() < deadline:  # kill each job as soon as it has 2 commits
            for kill, proc in procs.items():
                commits = tmp_path / kill / "_commits"
                if kill in killed or not commits.exists() or len(list(commits.glob("*.json"))) < 2:
                    continue
                found = _ray_processes(proc.pid)
                victims = [p for p, n in found.items() if kill == "raylet_and_workers" or n == "ray::DashboardAgent"]
                assert victims, f"no Ray processes to kill under the {kill} job: {found}"
                for p in victims:
                    os.kill(p, signal.SIGKILL)
                killed[kill] = time.monotonic()
            time.sleep(0.05)
        assert len(killed) == len(procs), f"not every job reached 2 commits: {sorted(killed)}"
        for kill, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1, (kill, err[-3000:])
            assert time.monotonic() - killed[kill] < 60, kill
            assert "no live node" in err and "Traceback" not in err, (kill, err[-3000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    out = tmp_path / KILLS[0]
    before = OutputFolder(str(out)).committed()
    assert 2 <= len(before) < 24
    r = subprocess.run(cmds[KILLS[0]] + ["--executor", "local"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["shards_skipped"] == len(before) and summary["shards_run"] == 24 - len(before)
    assert sorted(read_output(str(out), "samples").column("seed").to_pylist()) == list(range(48))


def test_removed_worker_node_does_not_strand_shards(tiny_ckpt, tmp_path):
    """A spot preemption: the worker node goes away mid-job; the job finishes on the head's capacity."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        out = tmp_path / "o"
        cmd = [IGPT, "generate", "--model", tiny_ckpt, "--output", str(out), "--num-samples", "60", "--shard-size", "2",
               "--batch-size", "2", "--contact-sheet", "0", "--workers", "3", "--torch-threads", "1",
               "--address", cluster.address, "--config", str(_timeout_config(tmp_path, 15))]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_commits(out, 4, proc)
            cluster.remove_node(worker, allow_graceful=False)
            stdout, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        # Ray may print the lost raylet's last words to stdout too; the summary is one JSON line among them
        summaries = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"')]
        assert summaries and summaries[-1]["rows"]["samples"] == 60, stdout[-3000:]
        assert sorted(read_output(str(out), "samples").column("seed").to_pylist()) == list(range(60))
    finally:
        cluster.shutdown()


def _timeout_config(tmp_path: Path, seconds: int) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(f"run:\n  actor_start_timeout: {seconds}\n")
    return p


def test_ray_started_early_in_the_background_is_joined_by_init_ray(ray_head):
    """start_ray_early joins (or starts) Ray in a thread while the driver plans; init_ray waits for it, SIGTERM
    still exits the driver as ray.init would have made it, and Ray's warning about its thread is not shown."""
    script = f"""
import signal, sys
from igpt_batch.run import cluster
cluster.start_ray_early({ray_head.address!r})
assert len(cluster._STARTING) == 1 and cluster._STARTING[0][0].is_alive()
assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
owns = cluster.init_ray({ray_head.address!r})
import ray
assert ray.is_initialized() and owns is False and cluster._STARTING == []
cluster.start_ray_early({ray_head.address!r})  # Ray is up: nothing to start
assert cluster._STARTING == []
print("nodes", len(ray.nodes()), ray.get(ray.remote(lambda: 7).remote()))  # Ray's processes live on
"""
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0 and "nodes 1 7" in proc.stdout, proc.stdout + proc.stderr
    assert "SIGTERM handler is not set" not in proc.stderr, proc.stderr
