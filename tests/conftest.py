"""Shared fixtures: the one config factory, tiny random ImageGPT checkpoints, real image files, the session's Ray head,
a real S3 server."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def make_tiny_checkpoint(path: Path, n_px: int = 8, k: int = 16, n_embd: int = 32, n_layer: int = 3, n_head: int = 4,
                         seed: int = 0) -> Path:
    """Save a random ImageGPT in the openai checkpoint format: config, safetensors, preprocessor with clusters."""
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    torch.manual_seed(seed)
    cfg = ImageGPTConfig(vocab_size=k + 1, n_positions=n_px * n_px, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    ImageGPTForCausalImageModeling(cfg).save_pretrained(path, safe_serialization=True)
    clusters = np.random.default_rng(seed).uniform(-1, 1, (k, 3)).round(4)
    ImageGPTImageProcessor(clusters=clusters.tolist(), size={"height": n_px, "width": n_px}).save_pretrained(path)
    return path


def tiny_hf(seed: int = 0, vocab_size: int = 17, n_positions: int = 64, n_embd: int = 32, n_layer: int = 3, **overrides):
    """A random tiny ImageGPT with non-trivial weights (random biases and layer-norm gains too), for oracle tests."""
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(seed)
    cfg = ImageGPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    hf = ImageGPTForCausalImageModeling(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return hf


def job_cfg(model, *values, keys=("output.path",), **over):
    """The tests' one config factory: a job of `model` (a checkpoint path or "demo") that draws no contact sheet.
    `values` (paths or URIs) fill the dotted `keys` in order; `over` holds dotted keys (**{"run.shard_size": 2}) and
    storage_options. A test module binds its own defaults once: functools.partial(job_cfg, **{...})."""
    from igpt_batch import config

    if len(values) > len(keys):
        raise TypeError(f"job_cfg: {len(values)} paths for the keys {keys}")
    named = {key: str(v) for key, v in zip(keys, values)}
    return config.load(None, {"model.name": str(model), "output.contact_sheet": 0, **named, **over})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: intra-op threads only add sync overhead (badly so on a shared, busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt")))


def real_photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Real photos as JPEG and PNG, plus two broken files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    for i, (name, arr) in enumerate(real_photos().items()):
        img = Image.fromarray(arr)
        img.save(d / f"{name}.jpg", quality=90)
        img.resize((64 + 16 * i, 48 + 8 * i)).save(d / f"{name}-small.png")
    (d / "truncated.jpg").write_bytes((d / "coffee.jpg").read_bytes()[:2000])
    (d / "text.jpg").write_text("not an image")
    return d


def write_manifest(path: Path, uris: list[str], ids: list[str] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"uri": uris} if ids is None else {"id": ids, "uri": uris}
    pq.write_table(pa.table(cols), path)
    return path


class RayHead:
    """`ray start --head --block` with a dashboard (for `ray job submit`) and a metrics export port, every port its
    own (other Rays run on this machine), in its own process group: stopped by PID (killpg), never by name."""

    def __init__(self, root: Path):
        self.root = root
        # Ray's unix sockets live under --temp-dir and must stay under 107 bytes: keep that path short
        self.ray_tmp = tempfile.mkdtemp(prefix="igpt-ray-", dir="/tmp")
        port, dash, mport, *own = free_ports(9)  # distinct: each held until all are chosen
        self.address = f"127.0.0.1:{port}"  # the GCS, for ray.init and --address
        self.dashboard = f"http://127.0.0.1:{dash}"  # for `ray job submit --address`
        self.metrics_url = f"http://127.0.0.1:{mport}/metrics"  # Prometheus text
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "node-manager-port", "object-manager-port", "ray-client-server-port")
        self.cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--metrics-export-port={mport}",
                    "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={self.ray_tmp}",
                    '--system-config={"metrics_report_interval_ms": 1000}',  # export every second, not every 10
                    *(f"--{flag}={p}" for flag, p in zip(flags, own))]

    def start(self) -> None:
        log = self.root / "head.log"
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
        while not (http_get(f"{self.dashboard}/api/version") and http_get(self.metrics_url)):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("ray head did not come up: " + log.read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)  # the head can take ~20 s to honour SIGTERM; its process group is ours to kill
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def http_get(url: str) -> str | None:
    """The body of a GET, or None while nothing answers."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """The session's one Ray head, shared by every single-node test that needs one (drivers, `ray job submit`,
    metrics). Multi-node and node-loss tests start their own."""
    head = RayHead(tmp_path_factory.mktemp("rayhead"))
    head.start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """This process joined to the session's Ray head (2 CPUs): drivers run in-process against it."""
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as the head was started
    import ray

    ray.init(address=ray_head.address, configure_logging=False)
    yield ray
    ray.shutdown()
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are chosen, so no two calls hand out one port."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_with_grpc() -> int:
    """A free port p whose gRPC twin p + 10000 (SeaweedFS's convention) is free too."""
    while True:
        p = free_port()
        if p >= 55000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


class S3Server:
    """A real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 with enforced access keys."""

    key, secret = "igpt-test-key", "igpt-test-secret-value"

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # every server of its own gets its own ports, so a restarted or second server never meets another's
        self.ports = {name: free_port_with_grpc() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        (root / "s3.json").write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
            {"accessKey": self.key, "secretKey": self.secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.proc = None

    def start(self) -> None:
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        (self.root / "data").mkdir(exist_ok=True)
        self.log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.config={self.root / 's3.json'}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
             *(f"-{name}.port={port}" for name, port in self.ports.items())],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.fs().ls("")
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"weed mini did not start; see {self.root / 'weed.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # by PID (its own process group), never by name
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def storage_options(self, secret: str | None = None) -> dict:
        return {"key": self.key, "secret": secret or self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def fs(self, secret: str | None = None):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options(secret))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.stop()


def bench_module(name: str):
    """bench/<name>.py imported into this process, as the script sees itself (bench/ on sys.path): its smoke runs
    in-process, without a fresh Python importing torch."""
    import importlib

    bench = str(REPO / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


@pytest.fixture
def torch_threads_kept():
    """A bench's main() may set torch's thread count; the rest of the session keeps its own."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Gate:
    """A real HTTP server with one real photo (any path) that is served only once the test opens the gate: a job
    that reads it cannot finish before then, so a test acts mid-job on a condition, not on timing."""

    def __init__(self):
        import http.server
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(real_photos()["coffee"]).save(buf, format="PNG")
        body, gate = buf.getvalue(), self
        self.requested, self.opened = threading.Event(), threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                gate.requested.set()
                gate.opened.wait(300)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/gate.png"

    def open(self) -> None:
        self.opened.set()

    def close(self) -> None:
        self.opened.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


def wait_for(fn, timeout: float = 120, while_running: subprocess.Popen | None = None):
    """fn()'s first truthy value, polled until `timeout` (or until `while_running` has exited); None if none came."""
    deadline = time.time() + timeout
    while time.time() < deadline and (while_running is None or while_running.poll() is None):
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    return None


def full_logits(model, ids):
    """Cache-free full-sequence f32 logits (B, T, V-1) of an igpt_batch IGPT: the reference path for tests."""
    import torch

    with torch.no_grad():
        return model.head(model._run(ids.to(model.device), None, 0))
