"""Real servers for the tests, each on its own ports and stopped by PID: SeaweedFS S3, a Ray head, HTTP servers."""
from __future__ import annotations

import contextlib
import http.server
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

BIN = Path(sys.executable).parent


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


@contextlib.contextmanager
def serving(server: http.server.HTTPServer):
    """`server` answering in a background thread while in the block (its base URL given); shut down and closed after."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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


def seaweed_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A free port for each service, each with its gRPC twin (p + 10000) free, none of them another's twin and no two
    alike: `weed mini` refuses a port "reserved for gRPC calculation" (one service's port on another's twin)."""
    while True:
        ports = [free_port_with_grpc() for _ in names]
        taken = set(ports) | {p + 10000 for p in ports}
        if len(taken) == 2 * len(ports):
            return dict(zip(names, ports))


class S3Server:
    """A real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 with enforced access keys."""

    key, secret = "igpt-test-key", "igpt-test-secret-value"

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # every server of its own gets its own ports, so a restarted or second server never meets another's
        self.ports = seaweed_ports(("master", "volume", "filer", "s3"))
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


class Gate:
    """A real HTTP server of one real image (a photo unless `body` is given) at any path; a path that `gated` accepts
    (every path by default) is answered only once the test opens the gate: a job that reads it cannot finish before
    then, so a test acts mid-job on a condition, not on timing."""

    def __init__(self, body: bytes | None = None, gated=lambda path: True):
        import io

        from PIL import Image
        from skimage import data

        if body is None:
            buf = io.BytesIO()
            Image.fromarray(data.coffee()).save(buf, format="PNG")
            body = buf.getvalue()
        gate = self
        self.requested, self.opened = threading.Event(), threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if gated(self.path):
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
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.uri = f"{self.base}/gate.png"

    def open(self) -> None:
        self.opened.set()

    def close(self) -> None:
        self.opened.set()
        self.server.shutdown()
        self.server.server_close()

