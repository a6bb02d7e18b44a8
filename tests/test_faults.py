"""Fault injection, for real: a catalogue of bad inputs, SIGKILLed actors and drivers, a restarted S3 server."""
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import S3Server, job_cfg, wait_for, write_manifest
from PIL import Image
from servers import serving
from skimage import data

from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import OutputFolder

IGPT = str(Path(sys.executable).parent / "igpt-batch")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def http_base():
    """A real HTTP server: /ok.png, 404 for anything unknown, 403 for /forbidden.png."""
    ok = encode(Image.fromarray(data.chelsea()), "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = {"/ok.png": (200, ok), "/forbidden.png": (403, b"no")}.get(self.path, (404, b"missing"))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)  # accepts connections, never answers
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as base:
        yield base, f"http://127.0.0.1:{hang.getsockname()[1]}"
    hang.close()


def bad_input_catalogue(d: Path, http_base: str, hang_base: str) -> tuple[list[str], set[str]]:
    """Write every kind of input we promise to handle; returns (uris, uris expected in errors/)."""
    photo = Image.fromarray(data.astronaut())
    jpg = encode(photo, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0)]]
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    good = {
        "ok.jpg": jpg,
        "one-pixel.png": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        "sixteen-bit.png": encode(Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)), "PNG"),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "palette-transparent.png": encode(pal, "PNG", transparency=0),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "exif-rotated.jpg": encode(photo.resize((64, 32)), "JPEG", exif=exif.tobytes()),
        "with space.png": encode(photo.resize((20, 20)), "PNG"),
    }
    bad = {
        "truncated.jpg": jpg[: len(jpg) // 3],
        "zero-byte.jpg": b"",
        "text.jpg": b"hello, I am not a JPEG\n",
        "bomb.png": encode(Image.new("1", (20_000, 4_000)), "PNG"),  # 80 MP, a few KB on disk
    }
    uris = []
    for name, payload in {**good, **bad}.items():
        (d / name).write_bytes(payload)
        uris.append(str(d / name))
    raw = os.fsencode(d) + b"/non-utf8-\xff.png"  # a non-UTF-8 file name, addressed via surrogateescape
    with open(raw, "wb") as f:
        f.write(encode(photo.resize((12, 12)), "PNG"))
    uris.append("file://" + urllib.parse.quote(raw))  # how a manifest names a non-UTF-8 path
    missing = str(d / "missing.png")
    remote_bad = [f"{http_base}/nope.png", f"{http_base}/forbidden.png", f"{hang_base}/hangs.png"]
    uris += [missing, f"{http_base}/ok.png", *remote_bad]
    return uris, {str(d / n) for n in bad} | {missing, *remote_bad}


def test_bad_input_catalogue_every_row_lands_exactly_once(ray_local, tiny_ckpt, tmp_path, http_base):
    (tmp_path / "in").mkdir()
    uris, expected_bad = bad_input_catalogue(tmp_path / "in", *http_base)
    manifest = write_manifest(tmp_path / "m.parquet", uris, [f"row{i}" for i in range(len(uris))])
    cfg = job_cfg(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(manifest), "input.read_timeout": 1.5,
                                                "run.shard_size": 5, "extract.layers": [1], "run.cpus_per_worker": 0.5,
                                                "run.workers": 2})
    t0 = time.time()
    s = run_job(cfg, "extract")
    assert time.time() - t0 < 120  # the hanging server is bounded by the timeout
    emb, err = (read_output(str(tmp_path / "o"), k) for k in ("embeddings", "errors"))
    assert set(err.column("uri").to_pylist()) == expected_bad
    assert set(emb.column("uri").to_pylist()) == set(uris) - expected_bad
    assert emb.num_rows + err.num_rows == len(uris) == s["input_rows"]  # nothing lost, nothing twice
    reasons = dict(zip(err.column("uri").to_pylist(), zip(err.column("stage").to_pylist(), err.column("error").to_pylist())))
    assert reasons[str(tmp_path / "in" / "missing.png")][0] == "read"
    assert reasons[str(tmp_path / "in" / "bomb.png")][0] == "decode" and "too large" in reasons[str(tmp_path / "in" / "bomb.png")][1]
    assert "404" in reasons[f"{http_base[0]}/nope.png"][1] and "403" in reasons[f"{http_base[0]}/forbidden.png"][1]
    assert "timed out" in reasons[f"{http_base[1]}/hangs.png"][1]
    sizes = dict(zip(emb.column("uri").to_pylist(), zip(emb.column("width").to_pylist(), emb.column("height").to_pylist())))
    assert sizes[str(tmp_path / "in" / "exif-rotated.jpg")] == (32, 64) and sizes[str(tmp_path / "in" / "one-pixel.png")] == (1, 1)


def gated_manifest(path: Path, image_dir: Path, gate_uri: str, before: int, after: int) -> tuple[str, list[str]]:
    """A manifest of `before` local photos, the gate's photo, then `after` more (ids row0...): one row per shard at
    shard size 1, so the gate's shard is shard `before`, and no shard after it can commit before the gate opens
    in an in-process job."""
    photos = sorted(str(p) for p in image_dir.glob("*-small.png"))
    uris = [photos[i % len(photos)] for i in range(before)] + [gate_uri] + [photos[i % len(photos)] for i in range(after)]
    ids = [f"row{i}" for i in range(len(uris))]
    return str(write_manifest(path, uris, ids)), ids


def committed_count(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0


def assert_verified(out: Path | str, so: dict | None = None) -> None:
    from igpt_batch.inspector import inspect

    lines = []
    assert inspect(str(out), verify=True, storage_options=so, echo=lines.append) == 0, lines
    assert lines[-1] == "verify: ok"


@pytest.mark.parametrize("fmt", ["parquet", "lance"])
def test_actor_sigkill_mid_job_retries_the_shard(ray_local, tiny_ckpt, image_dir, tmp_path, gate, fmt):
    """The actor is SIGKILLed while it waits for the gate's photo, having committed shard 0: a fresh actor retries.
    Lance: the shards' fragments are in the one dataset exactly once."""
    out = tmp_path / "o"
    manifest, ids = gated_manifest(tmp_path / "m.parquet", image_dir, gate.uri, before=1, after=4)
    cfg = job_cfg(tiny_ckpt, out, **{"input.manifest": manifest, "run.shard_size": 1, "run.cpus_per_worker": 0.5,
                                     "extract.layers": [1], "input.read_timeout": 300, "output.format": fmt})
    killed = []

    def killer():
        try:  # the actor has committed a shard and is now blocked on the gate's: kill it there
            if wait_for(lambda: gate.requested.is_set() and committed_count(out) >= 1):
                pid = next(iter(OutputFolder(str(out)).committed().values()))["worker_pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        finally:
            gate.open()

    t = threading.Thread(target=killer)
    t.start()
    s = run_job(cfg, "extract")
    t.join()
    assert killed, "the actor never reached the gate"
    assert sorted(read_output(str(out), "embeddings").column("id").to_pylist()) == sorted(ids)  # each row once
    pids = {name: r["worker_pid"] for name, r in OutputFolder(str(out)).committed().items()}
    assert killed[0] in pids.values() and pids["part-00001"] != killed[0]  # a fresh actor did the gate's shard
    assert s["shards_run"] == len(ids) and s["rows"] == {"embeddings": len(ids), "errors": 0}
    assert_verified(out)


@pytest.mark.parametrize("fmt", ["parquet", "lance"])
def test_driver_sigkill_then_rerun_recomputes_only_uncommitted_shards(tiny_ckpt, image_dir, tmp_path, gate, fmt):
    """Lance: the driver commits each arriving shard (output.lance_commit_s: 0), so it is killed after three Lance
    commits; the rerun commits the rest, none twice (a kill before a Lance commit: tests/test_lance_output.py)."""
    out = tmp_path / "o"
    manifest, ids = gated_manifest(tmp_path / "m.parquet", image_dir, gate.uri, before=3, after=3)
    (tmp_path / "c.yaml").write_text("output:\n  lance_commit_s: 0\n")
    cmd = [IGPT, "extract", "--model", tiny_ckpt, "--manifest", manifest, "--output", str(out), "--shard-size", "1",
           "--layer", "1", "--executor", "local", "--read-timeout", "300", "--output-format", fmt,
           "--config", str(tmp_path / "c.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # in-process shards run in order: 3 commits, then the driver waits for the gate, where it is killed
        assert wait_for(lambda: gate.requested.is_set() and committed_count(out) == 3, while_running=proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = OutputFolder(str(out)).committed()
    assert sorted(before) == ["part-00000", "part-00001", "part-00002"] and not (out / "_SUCCESS").exists()
    # a reader in the meantime sees only committed rows
    assert sorted(read_output(str(out), "embeddings").column("id").to_pylist()) == ids[:3]
    gate.open()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    summary = json.loads(r.stdout)
    assert summary["shards_skipped"] == 3 and summary["shards_run"] == len(ids) - 3
    after = OutputFolder(str(out)).committed()
    assert all(after[k] == v for k, v in before.items())  # committed shards were not recomputed
    assert sorted(read_output(str(out), "embeddings").column("id").to_pylist()) == sorted(ids)
    assert_verified(out)


@pytest.mark.parametrize("fmt", ["parquet", "lance"])
@pytest.mark.parametrize("fault", ["restart", "pause"])
def test_s3_outage_mid_job_is_survived(flaky_s3, tiny_ckpt, image_dir, tmp_path, gate, fault, fmt):
    """The store goes away while the job waits for the gate's photo; the gate opens during the outage, so the job's
    next write meets the outage and must wait it out. Lance: the worker's fragment write and the driver's Lance
    commit of the shard (output.lance_commit_s: 0) meet it too, through Lance's own object-store client."""
    server, bucket = flaky_s3, f"igpt-flaky-{fault}-{fmt}"
    server.fs().mkdir(bucket)
    so = server.storage_options()
    manifest, ids = gated_manifest(tmp_path / "m.parquet", image_dir, gate.uri, before=2, after=3)
    over = {"input.manifest": manifest, "run.shard_size": 1, "run.executor": "local", "extract.layers": [1],
            "input.read_timeout": 300, "output.format": fmt, "output.lance_commit_s": 0}
    cfg = job_cfg(tiny_ckpt, f"s3://{bucket}/o", storage_options=so, **over)
    back = []  # when the store was let back
    t = threading.Thread(target=outage, args=(server, bucket, gate, fault, back))
    t.start()
    s = run_job(cfg, "extract")
    finished = time.time()
    t.join()
    assert back, "the job never reached the gate with 2 commits"
    assert finished > back[0]  # its last writes came after the gate opened, into the outage: it waited it out
    assert s["rows"] == {"embeddings": len(ids), "errors": 0} and s["shards_run"] == len(ids)
    got = read_output(f"s3://{bucket}/o", "embeddings", so).sort_by("id")
    assert got.column("id").to_pylist() == sorted(ids)  # each row exactly once
    assert_verified(f"s3://{bucket}/o", so)
    if fmt == "lance":  # the same values as the Parquet output of the same rows, written without an outage
        run_job(job_cfg(tiny_ckpt, tmp_path / "pq", **over | {"output.format": "parquet"}), "extract")
        assert got.equals(read_output(str(tmp_path / "pq")).sort_by("id"))


def outage(server: S3Server, bucket: str, gate, fault: str, back: list) -> None:
    """Once the job has committed 2 shards and waits on the gate: the store goes away (stopped, or paused), the
    gate opens, and the store comes back after a few seconds (`back` gets the time)."""
    try:
        fs = server.fs()

        def commits() -> int:
            fs.invalidate_cache()  # s3fs caches listings
            return len(fs.glob(f"{bucket}/o/_commits/*.json"))

        if not wait_for(lambda: gate.requested.is_set() and commits() == 2):
            return
        if fault == "restart":
            server.stop()  # the store goes away mid-job ...
        else:
            os.killpg(server.proc.pid, signal.SIGSTOP)  # the store hangs: connections open, no answers ...
        gate.open()
        time.sleep(2 if fault == "restart" else 3)  # the outage's length (the job is already blocked on the store)
        back.append(time.time())
        if fault == "restart":
            server.start()  # ... and comes back on the same data directory
        else:
            os.killpg(server.proc.pid, signal.SIGCONT)  # ... then wakes up
    finally:
        gate.open()
