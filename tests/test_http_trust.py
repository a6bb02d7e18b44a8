"""HTTP inputs a hostile server or user can send: error responses never poison a host's connections, image URLs with
user:pass@ are refused, manifest URLs never leak their credentials and a dropped manifest read is a message."""
import functools
import http.server
import socket
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from servers import serving

from igpt_batch import config, errors
from igpt_batch.errors import ManifestError
from igpt_batch.inputs import fetch
from igpt_batch.inputs.manifest import scan_manifest
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output

MAX_BYTES = 400_000


def _rst(handler) -> None:
    handler.wfile.flush()
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True


class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the client hanging up on a bad answer is the point
        pass


@pytest.fixture
def hostile(monkeypatch, image_dir):
    """HTTP/1.1 keep-alive server of image_dir whose /bad/<kind>/<n> paths answer badly: 404 and 401 with bodies,
    a Content-Length over max_bytes, a body over max_bytes without one, a reset before and in the middle of a body;
    /m/... serves files put in `files`, `drop` paths cut their body short."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = {"files": {}, "drop": set(), "auth": []}

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code, body=b"", length=None, close=False, typed=False):
            self.send_response(code)
            if typed:
                self.send_header("Content-Type", "text/csv")
            if length is not None:
                self.send_header("Content-Length", str(length))
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            state["auth"].append(self.headers.get("Authorization"))
            path = self.path.partition("?")[0]
            if path.startswith("/m/"):
                body = state["files"].get(path[3:])
                if body is None:
                    return self._send(404, b"no", 2)
                if path[3:] in state["drop"]:  # promise the whole file, send a third, reset
                    self._send(200, body[:len(body) // 3], len(body), typed=state.get("typed"))
                    return _rst(self)
                return self._send(200, body, len(body))
            if not path.startswith("/bad/"):
                return super().do_GET()
            kind = path.split("/")[2]
            if kind == "404":
                self._send(404, b"<html>not here</html>" * 50, 21 * 50)
            elif kind == "401":
                self._send(401, b"denied", 6)
            elif kind == "413":  # too large by Content-Length: the body is never read
                self._send(200, b"\xff" * 1000, 10 * MAX_BYTES)
                _rst(self)
            elif kind == "huge":  # no Content-Length: read until the cap, then given up
                self._send(200, b"\xff" * (MAX_BYTES + 100_000), close=True)
            elif kind == "reset":  # before any answer: retried, then given up
                _rst(self)
            elif kind == "cut":  # in the middle of the body
                self._send(200, b"\xff" * 1000, 50_000)
                _rst(self)
            elif kind == "errbig":  # an error with a body larger than max_bytes
                self._send(403, b"x" * (2 * MAX_BYTES), 2 * MAX_BYTES)

    with serving(Quiet(("127.0.0.1", 0), functools.partial(Handler, directory=str(image_dir)))) as base:
        yield state, base


BAD = ("404", "401", "413", "huge", "reset", "cut", "errbig")


def test_error_responses_never_poison_the_host(hostile, tiny_ckpt, image_dir, tmp_path):
    """Every kind of bad answer, many times over a 2-connection host limit, then good images: all embedded."""
    _, base = hostile
    photos = sorted(p.name for p in image_dir.iterdir() if p.suffix == ".jpg" and p.stem not in ("text", "truncated"))
    bad = [(f"bad-{k}-{n}", f"{base}/bad/{k}/{n}") for n in range(3) for k in BAD]
    good = [(f"good-{n}-{p}", f"{base}/{p}") for n in range(3) for p in photos]
    rows = bad + good
    pq.write_table(pa.table({"id": [r[0] for r in rows], "uri": [r[1] for r in rows]}), tmp_path / "m.parquet")
    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": str(tmp_path / "out"), "run.executor": "local",
                             "run.shard_size": 64, "extract.batch_size": 4, "extract.layers": [1],
                             "output.contact_sheet": 0, "input.manifest": str(tmp_path / "m.parquet"),
                             "input.read_timeout": 3, "input.retries": 1, "input.host_connections": 2,
                             "input.max_bytes": MAX_BYTES})
    s = run_job(cfg, "extract")
    assert s["rows"] == {"embeddings": len(good), "errors": len(bad)}
    t = read_output(str(tmp_path / "out"), "embeddings").sort_by("id")
    assert t.column("id").to_pylist() == sorted(r[0] for r in good)
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    by_photo = {}
    for i, row in enumerate(t.column("id").to_pylist()):  # the same photo gives the same embedding every time
        by_photo.setdefault(row.split("-", 2)[2], []).append(emb[i])
    for got in by_photo.values():
        np.testing.assert_allclose(got[0], got[-1], atol=1e-6)
    e = read_output(str(tmp_path / "out"), "errors")
    reasons = dict(zip(e.column("id").to_pylist(), e.column("error").to_pylist()))
    assert "HTTP 404" in reasons["bad-404-0"] and "HTTP 401" in reasons["bad-401-0"]
    assert "too large" in reasons["bad-413-0"] and "too large" in reasons["bad-huge-0"]
    assert "timed out" not in " ".join(reasons.values())


def test_error_responses_return_their_connection(hostile, image_dir):
    """Directly: 4x the host limit of each bad answer, and a good read still gets a connection at once."""
    _, base = hostile
    for kind in BAD:
        for n in range(8):
            with pytest.raises(errors.ImageError):
                fetch.read_bytes(f"{base}/bad/{kind}/{n}", timeout=2, retries=0, max_bytes=MAX_BYTES,
                                 host_connections=2)
    assert fetch.read_bytes(f"{base}/coffee.jpg", timeout=2, host_connections=2) == (image_dir / "coffee.jpg").read_bytes()


# ----------------------------------------------------------------------------- manifest URLs

SECRETS = ("s3cretpw", "SIGSECRET", "CREDSECRET")


def secret_url(base: str, name: str) -> str:
    host = base.partition("://")[2]
    return (f"http://alice:s3cretpw@{host}/m/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=CREDSECRET"
            "&X-Amz-Signature=SIGSECRET")


def assert_no_secret(text: str) -> None:
    assert not [s for s in SECRETS if s in text], text


@pytest.mark.parametrize("name, body, why", [
    ("dup.csv", b"id,uri\na,x.jpg\na,y.jpg\n", "1 duplicate ids"),
    ("empty.csv", b"id,uri\n", "is empty"),
    ("broken.parquet", b"PAR1 this is not parquet at all PAR1", "cannot read manifest"),
    ("noid.jsonl", b'{"uri": "a.jpg"}\n{"id": "b", "uri": "b.jpg"}\n', "has an 'id' but earlier rows"),
    ("nouri.csv", b"id,url\na,x.jpg\n", "has no 'uri' column"),
])
def test_manifest_url_credentials_never_in_messages(hostile, name, body, why):
    state, base = hostile
    state["files"][name] = body
    with pytest.raises(ManifestError, match=why) as e:
        scan_manifest(secret_url(base, name))
    assert_no_secret(str(e.value))
    assert "/m/" + name in str(e.value) or why == "1 duplicate ids"


def test_manifest_url_with_a_query_and_basic_auth_images(hostile, tiny_ckpt, image_dir, tmp_path, capfd):
    """m.csv?X-Amz-Signature=... is a CSV by its path; user:pass@ in an image URL is sent as Basic auth; no secret
    reaches stderr, stdout or any file of the output."""
    import base64
    import subprocess
    import sys

    state, base = hostile
    host = base.partition("://")[2]
    names = ["coffee", "rocket"]
    state["files"]["m.csv"] = ("id,uri\n" + "".join(f"{n},http://bob:s3cretpw@{host}/{n}.jpg\n" for n in names)).encode()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "igpt_batch.cli", "extract", "--manifest", secret_url(base, "m.csv"),
                        "--output", str(out), "--executor", "local", "--model", tiny_ckpt, "--layer", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert_no_secret(r.stdout + r.stderr)
    t = read_output(str(out), "embeddings").sort_by("id")
    assert t.column("id").to_pylist() == names
    assert t.column("uri").to_pylist() == [f"http://{host}/{n}.jpg" for n in names]
    basic = "Basic " + base64.b64encode(b"bob:s3cretpw").decode()
    assert state["auth"].count(basic) == len(names)  # the images, and only them: the manifest's own read is aiohttp's
    for f in out.rglob("*"):
        if f.is_file():
            assert_no_secret(f.read_bytes().decode("latin-1"))


@pytest.mark.parametrize("typed", [True, False])  # untyped, fsspec reads it while listing; typed, while reading
def test_dropped_manifest_connection_is_a_message(hostile, tiny_ckpt, tmp_path, typed):
    import subprocess
    import sys

    state, base = hostile
    state["typed"] = typed
    state["files"]["m.csv"] = b"id,uri\n" + b"".join(b"r%d,x%d.jpg\n" % (i, i) for i in range(200_000))
    state["drop"].add("m.csv")
    r = subprocess.run([sys.executable, "-m", "igpt_batch.cli", "extract", "--manifest", secret_url(base, "m.csv"),
                        "--output", str(tmp_path / "out"), "--executor", "local", "--model", tiny_ckpt],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot read manifest" in r.stderr and "/m/m.csv" in r.stderr
    assert_no_secret(r.stderr)
