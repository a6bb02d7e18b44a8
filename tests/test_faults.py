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
from conftest import S3Server, write_manifest
from PIL import Image
from skimage import data

from igpt_batch import config
from igpt_batch.run.driver import run_job
from igpt_batch.run.storage import OutputFolder, read_output

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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)  # accepts connections, never answers
    yield f"http://127.0.0.1:{server.server_address[1]}", f"http://127.0.0.1:{hang.getsockname()[1]}"
    server.shutdown()
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
    cfg = config.load(None, {"model.name": tiny_ckpt, "input.manifest": str(manifest), "output.path": str(tmp_path / "o"),
                             "input.read_timeout": 1.5, "run.shard_size": 5, "extract.layers": [1],
                             "run.cpus_per_worker": 0.5, "run.workers": 2})
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


def test_actor_sigkill_mid_job_retries_the_shard(ray_local, tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": str(out), "generate.num_samples": 24,
                             "generate.batch_size": 1, "run.shard_size": 2, "run.cpus_per_worker": 0.5,
                             "output.contact_sheet": 0})
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            commits = OutputFolder(str(out)).committed() if (out / "_commits").exists() else {}
            if commits:
                pid = next(iter(commits.values()))["worker_pid"]
                os.kill(pid, signal.SIGKILL)  # the actor is busy with its next shard now
                killed.append(pid)
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    s = run_job(cfg, "generate")
    t.join()
    assert killed, "the actor was never killed"
    samples = read_output(str(out), "samples")
    assert sorted(samples.column("seed").to_pylist()) == list(range(24))  # every seed exactly once
    pids = {r["worker_pid"] for r in OutputFolder(str(out)).committed().values()}
    assert killed[0] in pids and len(pids) == 2  # a fresh actor finished the job
    assert s["shards_run"] == 12


def test_driver_sigkill_then_rerun_recomputes_only_uncommitted_shards(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    cmd = [IGPT, "generate", "--model", tiny_ckpt, "--output", str(out), "--num-samples", "30", "--shard-size", "2",
           "--batch-size", "1", "--executor", "local", "--contact-sheet", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else []) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = OutputFolder(str(out)).committed()
    assert 3 <= len(before) < 15 and not (out / "_SUCCESS").exists()
    # a reader in the meantime sees only committed rows
    assert read_output(str(out), "samples").num_rows == 2 * len(before)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    summary = json.loads(r.stdout)
    assert summary["shards_skipped"] == len(before) and summary["shards_run"] == 15 - len(before)
    after = OutputFolder(str(out)).committed()
    assert all(after[k] == v for k, v in before.items())  # committed shards were not recomputed
    assert sorted(read_output(str(out), "samples").column("seed").to_pylist()) == list(range(30))


@pytest.mark.parametrize("fault", ["restart", "pause"])
def test_s3_outage_mid_job_is_survived(tiny_ckpt, tmp_path, fault):
    server = S3Server(tmp_path / "weed")
    server.start()
    try:
        server.fs().mkdir("igpt-flaky")  # a fresh server per case
        so = server.storage_options()
        cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": "s3://igpt-flaky/o", "storage_options": so,
                                 "generate.num_samples": 40, "generate.batch_size": 1, "run.shard_size": 2,
                                 "run.executor": "local", "output.contact_sheet": 0})
        down_s = 2 if fault == "restart" else 3
        outage = []  # when the store went away

        def restart():
            fs = server.fs()
            deadline = time.time() + 120
            while time.time() < deadline:
                fs.invalidate_cache()  # s3fs caches listings
                if len(fs.glob("igpt-flaky/o/_commits/*.json")) >= 2:
                    break
                time.sleep(0.05)
            outage.append(time.time())
            if fault == "restart":
                server.stop()  # the store goes away mid-job ...
                time.sleep(down_s)
                server.start()  # ... and comes back on the same data directory
            else:
                os.killpg(server.proc.pid, signal.SIGSTOP)  # the store hangs: connections open, no answers ...
                time.sleep(down_s)
                os.killpg(server.proc.pid, signal.SIGCONT)  # ... then wakes up

        t = threading.Thread(target=restart)
        t.start()
        s = run_job(cfg, "generate")
        finished = time.time()
        t.join()
        # The outage began while the job ran, and the job (whose last step is a write) waited it out.
        # (Not "finished after start() returned": the job may reconnect the moment the port is back.)
        assert outage and finished > outage[0] + down_s
        assert s["rows"] == {"samples": 40} and s["shards_run"] == 20
        assert sorted(read_output("s3://igpt-flaky/o", "samples", so).column("seed").to_pylist()) == list(range(40))
    finally:
        server.stop()
