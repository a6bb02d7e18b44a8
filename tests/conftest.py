"""Shared fixtures: the one config factory, tiny random ImageGPT checkpoints, real image files, the session's Ray head,
a real S3 server."""
from __future__ import annotations

import functools
import http.server
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from servers import Gate, RayHead, S3Server, free_port, free_ports, http_get, serving  # noqa: F401 (the tests' names)

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


def make_tar(samples: dict[str, bytes], ext: str = "jpg") -> bytes:
    """A WebDataset tar: per sample key, its image (`ext`) and a JSON caption."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, data in samples.items():
            for name, blob in ((f"{key}.{ext}", data), (f"{key}.json", b'{"caption": "x"}')):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def write_manifest(path: Path, uris: list[str], ids: list[str] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"uri": uris} if ids is None else {"id": ids, "uri": uris}
    pq.write_table(pa.table(cols), path)
    return path


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


def _running_s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    yield from _running_s3(tmp_path_factory)


@pytest.fixture(scope="module")
def flaky_s3(tmp_path_factory):
    """A SeaweedFS server of the test module's own, which its tests stop and start (each case its own bucket); not
    the session's shared one, which other tests use meanwhile."""
    yield from _running_s3(tmp_path_factory)


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


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serves tmp_path on 127.0.0.1."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    with serving(server) as base:
        yield tmp_path, base


@pytest.fixture
def http_server(monkeypatch, image_dir):
    """Serves image_dir on 127.0.0.1; `mode` decides each request: fail once per path (503 or reset), always 429,
    redirect, or "slow": hold each request until a second is in (or `expect` requests have arrived)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = {"mode": "ok", "seen": set(), "agents": set(), "active": 0, "max_active": 0, "arrived": 0, "expect": 0,
             "lock": threading.Condition()}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            with state["lock"]:
                state["agents"].add(self.headers.get("User-Agent"))
                first = self.path not in state["seen"]
                state["seen"].add(self.path)
                state["active"] += 1
                state["arrived"] += 1
                state["max_active"] = max(state["max_active"], state["active"])
                state["lock"].notify_all()
                if state["mode"] == "slow":  # hold each request until another is in too (or none is to come)
                    state["lock"].wait_for(lambda: state["active"] >= 2 or state["arrived"] >= state["expect"], 60)
                # counted out before answering: the client frees its connection only once it has the answer
                state["active"] -= 1
            self._answer(state["mode"], first)

        def _answer(self, mode, first):
            if mode == "429" or (mode == "503" and first):
                self.send_response(429 if mode == "429" else 503)
                self.send_header("Retry-After", "3600" if mode == "429" else "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif mode == "reset" and first:  # RST instead of an answer
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
            elif mode == "redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/hostname")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(image_dir)))
    with serving(server) as base:
        yield state, base


def encode_image(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_file(path, payload: bytes) -> str:
    with open(path, "wb") as f:
        f.write(payload)
    return os.fsdecode(path)


def read_err(uri: str, **kw):
    """The read error fetch.read_bytes(uri) raises (its stage is "read")."""
    from igpt_batch.errors import ImageError
    from igpt_batch.inputs import fetch

    with pytest.raises(ImageError) as e:
        fetch.read_bytes(uri, **kw)
    assert e.value.stage == "read"
    return e.value


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
