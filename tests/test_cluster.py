"""The cluster path as users run it: a Ray head with no CPUs and two worker nodes, each with its own Hugging Face
cache and model cache, and a driver in a private mount namespace whose files (its model, its own cache) are on a
tmpfs no node sees. SeaweedFS holds the images, the manifest, the outputs and an s3:// checkpoint: the only
storage every process shares. Processes are stopped by the PIDs that name this module's Ray folder, never `ray stop`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_checkpoint, write_manifest
from ray_nodes import HUB_ID, Cluster, node_of, pids_naming
from servers import Gate

from igpt_batch.model.resolve import DEMO_MODEL_DIR

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs unshare -m and mount (root) for the driver's private files")
BUCKET = "igpt-cluster"


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="igc-", dir="/tmp"))  # short: Ray's socket paths live under it
    c = Cluster(root)
    try:
        c.start()
        # /shared/model: the demo checkpoint on the host, which n1 and the driver see; n2 has a different copy
        # there (a tiny random model) on a tmpfs of its own. /baked/model: on the host only, hidden from the driver.
        for name in ("shared", "baked"):
            shutil.copytree(DEMO_MODEL_DIR, root / name / "model")
        other = make_tiny_checkpoint(root / "other")
        c.add_node("n1")  # one after the other: two raylets registering at once can time out on a loaded machine
        c.add_node("n2", setup=f"mount -t tmpfs igpt-n2 {root}/shared && cp -r {other} {root}/shared/model")
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(s3_server, image_dir):
    """Four real photos and a manifest on SeaweedFS, and the demo checkpoint as an s3:// folder."""
    fs = s3_server.fs()
    fs.mkdir(BUCKET)
    names = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg"]
    for n in names:
        fs.put_file(str(image_dir / n), f"{BUCKET}/img/{n}")
    for f in DEMO_MODEL_DIR.iterdir():
        fs.put_file(str(f), f"{BUCKET}/models/demo/{f.name}")
    local = write_manifest(Path(tempfile.mkdtemp()) / "m.parquet", [f"s3://{BUCKET}/img/{n}" for n in names], names)
    fs.put_file(str(local), f"{BUCKET}/manifest.parquet")
    return {"manifest": f"s3://{BUCKET}/manifest.parquet", "so": s3_server.storage_options()}


def extract_args(inputs, model: str, out: str) -> list[str]:
    return ["extract", "--model", model, "--manifest", inputs["manifest"], "--output", f"s3://{BUCKET}/{out}",
            "--storage-options", json.dumps(inputs["so"]), "--workers", "2", "--cpus-per-worker", "1",
            "--shard-size", "1", "--torch-threads", "1", "--max-retries", "1"]


@pytest.fixture(scope="module")
def local_embeddings(inputs, image_dir, tmp_path_factory):
    """The oracle: the same rows, read from local files, embedded in-process by the demo model."""
    from igpt_batch import config
    from igpt_batch.run.driver import run_job
    from igpt_batch.run.readers import read_output

    names = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg"]
    d = tmp_path_factory.mktemp("local")
    m = write_manifest(d / "m.parquet", [str(image_dir / n) for n in names], names)
    cfg = config.load(None, {"model.name": "demo", "input.manifest": str(m), "output.path": str(d / "out"),
                             "run.executor": "local", "run.shard_size": 1, "run.torch_threads": 1})
    run_job(cfg, "extract")
    return embeddings(read_output(str(d / "out")))


def embeddings(table) -> dict[str, np.ndarray]:
    return dict(zip(table.column("id").to_pylist(), np.asarray(table.column("embedding").to_pylist(), np.float32)))


def assert_same_embeddings(inputs, out: str, expected: dict) -> None:
    from igpt_batch.run.readers import read_output

    got = embeddings(read_output(f"s3://{BUCKET}/{out}", "embeddings", inputs["so"]))
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-5)


def test_a_hub_id_resolves_in_each_nodes_own_offline_cache(cluster, inputs, local_embeddings):
    # the driver's own cache is on its tmpfs: the path it finds there exists on no worker node
    setup = f"mkdir -p {cluster.root}/driver/hf && cp -r {cluster.root}/n1/hf/hub {cluster.root}/driver/hf/"
    p, _ = cluster.drive(extract_args(inputs, HUB_ID, "hub"), setup)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_embeddings(inputs, "hub", local_embeddings)
    job = json.loads(cluster_fs(inputs).cat(f"{BUCKET}/hub/_job.json"))
    assert job["model"] == HUB_ID


def cluster_fs(inputs):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **inputs["so"])


def test_an_s3_checkpoint_is_downloaded_once_per_node_into_a_cache_keyed_by_fingerprint(cluster, inputs,
                                                                                         local_embeddings):
    from igpt_batch.model.checkpoint import read_info

    p, _ = cluster.drive(extract_args(inputs, f"s3://{BUCKET}/models/demo", "s3model"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_embeddings(inputs, "s3model", local_embeddings)
    fingerprint = read_info("demo").weights_fingerprint
    cached = [cluster.root / n / "models" for n in cluster.nodes if (cluster.root / n / "models").exists()]
    assert cached, "no node cached the checkpoint"
    for folder in cached:  # one finished copy per node, named by its fingerprint; no half-written folder left
        assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == [fingerprint]
        assert sorted(f.name for f in (folder / fingerprint).iterdir()) == sorted(f.name for f in DEMO_MODEL_DIR.iterdir()
                                                                                  if f.suffix in (".json", ".safetensors"))


def test_a_folder_only_the_driver_has_fails_fast_naming_folder_node_and_fix(cluster, inputs):
    private = cluster.root / "driver" / "model"
    p, seconds = cluster.drive(extract_args(inputs, str(private), "driveronly"), f"cp -r {DEMO_MODEL_DIR} {private}")
    assert p.returncode != 0
    err = p.stderr
    assert "no worker could start" in err and f"model folder {private} does not exist on node" in err, err[-3000:]
    assert "Ray node" in err and "s3://" in err and "hub id" in err and "shared" in err
    assert "Traceback" not in err
    assert "attempt" not in err and "retries" not in err  # refused at start, not shard by shard
    assert not cluster_fs(inputs).glob(f"{BUCKET}/driveronly/_commits/*")
    assert seconds < 120, seconds  # generous under load; the old path took every shard's retries


def test_a_folder_only_the_workers_have_works_and_the_first_worker_reports_it(cluster, inputs, local_embeddings):
    baked = cluster.root / "baked" / "model"  # as if baked into the workers' image; the driver has none
    args = extract_args(inputs, str(baked), "baked")
    args[args.index("--workers") + 1] = "1"  # one worker node is enough: the point is the driver's side
    p, _ = cluster.drive(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"model folder {baked} is not on the driver's node; Ray node" in p.stderr
    assert_same_embeddings(inputs, "baked", local_embeddings)


def test_a_node_with_a_different_copy_refuses_and_the_others_finish_the_job(cluster, inputs, local_embeddings):
    from igpt_batch.model.checkpoint import read_info

    shared = cluster.root / "shared" / "model"
    p, _ = cluster.drive(extract_args(inputs, str(shared), "mixed"))
    assert p.returncode == 0, p.stderr[-3000:]
    other = read_info(str(cluster.root / "other")).weights_fingerprint
    demo = read_info("demo").weights_fingerprint
    assert f"a worker refused to start: model {shared} at {shared} on node" in p.stderr
    assert f"has weights fingerprint {other}, the job's is {demo}" in p.stderr
    assert_same_embeddings(inputs, "mixed", local_embeddings)  # only the driver's copy computed rows



def test_a_refresh_night_on_the_cluster_stores_every_image_once(cluster, inputs, local_embeddings):
    """A night with its store on SeaweedFS and its model from the object store: the workers write the store's
    shards, the driver the Lance table; nothing but S3 is shared. It is planned in 2 buckets of Ray tasks, which
    meet only in the store's planning folder (in the bucket)."""
    from igpt_batch.store.refresh import read_current

    args = extract_args(inputs, f"s3://{BUCKET}/models/demo", "unused")
    args[0] = "refresh"
    i = args.index("--output")
    args[i:i + 2] = ["--store", f"s3://{BUCKET}/store"]
    (cluster.root / "night.yaml").write_text("refresh: {plan_bucket_rows: 2}\n")  # read by the driver alone
    args += ["--config", str(cluster.root / "night.yaml")]
    p, _ = cluster.drive(args)
    assert p.returncode == 0, p.stderr[-3000:]
    current = read_current(f"s3://{BUCKET}/store", inputs["so"])
    assert sorted(current.column("id").to_pylist()) == sorted(local_embeddings)
    for row in current.select(["id", "embedding"]).to_pylist():
        np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), local_embeddings[row["id"]], rtol=1e-5,
                                   atol=1e-5)
    fs = cluster_fs(inputs)
    fs.invalidate_cache()
    assert [f for f in fs.find(f"{BUCKET}/store") if "/_planning/" in f] == []  # the planning files are removed


@pytest.fixture
def gated_images(image_dir):
    """An HTTP server of one JPEG: /free/N answers at once, /gated/N only once the test opens the gate, so the
    test decides when work can go on (never a sleep)."""
    gate = Gate((image_dir / "coffee.jpg").read_bytes(), gated=lambda path: path.startswith("/gated/"))
    yield gate.base, gate
    gate.close()


def worker_raylets(cluster) -> dict[int, str]:
    """The live worker nodes' raylets: pid -> cmdline."""
    cmdline = {q: Path(f"/proc/{q}/cmdline").read_bytes().decode(errors="replace") for q in pids_naming(cluster.root)}
    return {q: c for q, c in cmdline.items() if "raylet" in c.split("\0")[0]
            and any(f"={port}" in c for port in cluster.nodes.values())}


@pytest.mark.parametrize("fmt", ["parquet", "lance"])
def test_an_actor_killed_and_a_node_lost_mid_job_lose_no_row(cluster, inputs, gated_images, fmt):
    """Runs last: it takes a worker node away (each format's run starts with two). Every row lands exactly once,
    computed by the workers that remain; a Lance output verifies (each shard's fragments once, no id twice)."""
    while len(worker_raylets(cluster)) < 2:  # the parquet run took one away
        cluster.add_node(f"n{len(cluster.nodes) + 1}")
    base, gate = gated_images
    fs, n, out = cluster_fs(inputs), 24, f"faults-{fmt}"
    uris = [f"{base}/{'free' if i < 4 else 'gated'}/{i}.jpg" for i in range(n)]  # two shards can commit at once
    local = write_manifest(cluster.root / "gated.parquet", uris, [f"r{i:02d}" for i in range(n)])
    fs.put_file(str(local), f"{BUCKET}/gated.parquet")
    args = extract_args(inputs, "demo", out) + ["--output-format", fmt]
    args[args.index(inputs["manifest"])] = f"s3://{BUCKET}/gated.parquet"
    args[args.index("--shard-size") + 1], args[args.index("--max-retries") + 1] = "2", "3"
    p = cluster.drive_async(args + ["--read-timeout", "300"])
    try:
        deadline = time.monotonic() + 240
        while not fs.glob(f"{BUCKET}/{out}/_commits/*.json") and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a condition: the first commit
        fs.invalidate_cache()
        (first,) = fs.glob(f"{BUCKET}/{out}/_commits/*.json")[:1]
        pid = json.loads(fs.cat(first))["worker_pid"]
        killed_node = node_of(pid)
        os.kill(pid, signal.SIGKILL)  # an actor dies; the other one is held at the gate
        raylets = [q for q in worker_raylets(cluster) if q not in killed_node]
        (raylet,) = raylets  # the worker node the killed actor was not on
        stop_now = node_of(raylet)
        for q in stop_now:  # the other node goes away, as a preempted spot node does
            os.kill(q, signal.SIGKILL)
        gate.open()
        assert p.wait(240) == 0, open(cluster.root / "driver.err").read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    err = open(cluster.root / "driver.err").read()
    # both losses reached the pool (a lost node's actor may report before the node is declared dead)
    assert err.count("worker died") + err.count("worker's node died") >= 2, err[-3000:]
    from igpt_batch.run.readers import read_output

    ids = read_output(f"s3://{BUCKET}/{out}", "embeddings", inputs["so"]).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:02d}" for i in range(n)]  # every row exactly once
    from igpt_batch.inspector import inspect

    lines = []
    assert inspect(f"s3://{BUCKET}/{out}", verify=True, storage_options=inputs["so"], echo=lines.append) == 0, lines
