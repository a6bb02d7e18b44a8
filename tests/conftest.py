"""Shared fixtures: tiny random ImageGPT checkpoints, real image files, a local Ray, a real S3 server."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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


@pytest.fixture(scope="session")
def ray_local():
    """One isolated local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


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


def full_logits(model, ids):
    """Cache-free full-sequence f32 logits (B, T, V-1) of an igpt_batch IGPT: the reference path for tests."""
    import torch

    with torch.no_grad():
        return model.head(model._run(ids.to(model.device), None, 0))


@pytest.fixture(params=["local", "s3"])
def output_url(request, tmp_path):
    """(url, storage options) of a fresh output folder, on local disk and in a new SeaweedFS bucket."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    s3 = request.getfixturevalue("s3_server")
    bucket = f"out-{tmp_path.name[-24:].lower().replace('_', '-').strip('-')}"
    s3.fs().mkdir(bucket)
    return f"s3://{bucket}/out", s3.storage_options()
