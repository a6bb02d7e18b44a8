"""igpt_batch.inputs.fetch: local paths, file://, fsspec URLs and the deadline, with read errors that say why and
never leak a secret."""
import os
import socket
import time

import fsspec
from conftest import encode_image, read_err, write_file
from PIL import Image

from igpt_batch import errors
from igpt_batch.inputs import fetch, images


def test_read_errors(tmp_path):
    err = read_err(str(tmp_path / "missing.png"))
    assert err.reason.startswith("file not found:") and "missing.png" in str(err)
    assert "is a directory" in read_err(str(tmp_path)).reason
    big = write_file(tmp_path / "big.png", encode_image(Image.new("RGB", (64, 64)), "PNG") + b"\0" * 5000)
    assert "too large" in read_err(big, max_bytes=1000).reason
    assert len(fetch.read_bytes(big, max_bytes=10_000)) > 5000


def test_permission_denied(tmp_path):
    uri = write_file(tmp_path / "secret.png", encode_image(Image.new("RGB", (2, 2)), "PNG"))
    os.chmod(uri, 0)
    try:
        if os.access(uri, os.R_OK):  # root ignores file modes: then the read must simply work
            assert images.decode(fetch.read_bytes(uri)).size == (2, 2)
        else:
            assert read_err(uri).reason.startswith("permission denied:")
    finally:
        os.chmod(uri, 0o644)


def test_paths_with_spaces_and_non_utf8_bytes(tmp_path):
    png = encode_image(Image.new("RGB", (3, 2), (1, 2, 3)), "PNG")
    spaced = write_file(tmp_path / "my photo (1).png", png)
    assert images.load_rgb(spaced, 2)[1:] == (3, 2)
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xff image.png")
    write_file(raw, png)
    name = os.fsdecode(raw)  # str with a surrogate escape for the 0xff byte
    assert "\udcff" in name
    assert fetch.read_bytes(name) == png
    err = read_err(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"gone\xff.png")))
    str(err).encode("utf-8")  # the message is printable, surrogates are escaped


def test_fsspec_memory_filesystem():
    fs = fsspec.filesystem("memory")
    png = encode_image(Image.new("RGB", (5, 4), (9, 8, 7)), "PNG")
    fs.pipe("/igpt-test/x.png", png)
    try:
        assert fetch.read_bytes("memory://igpt-test/x.png") == png
        assert "too large" in read_err("memory://igpt-test/x.png", max_bytes=10).reason
        assert "file not found" in read_err("memory://igpt-test/nope.png").reason
    finally:
        fs.rm("/igpt-test", recursive=True)


def test_http_server_that_never_answers_times_out():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)  # the kernel completes the handshake; nobody ever reads or replies
    try:
        t0 = time.perf_counter()
        err = read_err(f"http://127.0.0.1:{sock.getsockname()[1]}/x.png", timeout=1.5)
        assert time.perf_counter() - t0 < 6
        assert "timed out after 1.5s" in err.reason
    finally:
        sock.close()


def test_unknown_protocols_and_bad_storage_options_are_read_errors():
    assert "unknown protocol" in read_err("nosuchproto://bkt/x.png").reason
    err = read_err("memory://igpt-test/x.png", storage_options={"nonsense_option": "zzz-secret-value"})
    assert "zzz-secret-value" not in err.reason


def test_missing_credentials_are_read_errors(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup over the network
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    so = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "skip_instance_cache": True}
    assert "access denied" in read_err("s3://bkt/x.png", storage_options=so, timeout=20).reason


def test_refused_connections_are_read_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert read_err(f"http://127.0.0.1:{port}/x.png", timeout=5).reason.startswith("cannot connect (")
    so = {"key": "k", "secret": "zzz-secret-value", "skip_instance_cache": True,
          "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    err = read_err("s3://bkt/x.png", storage_options=so, timeout=20)
    assert "zzz-secret-value" not in err.reason and errors.reason_class(err.reason) in (
        "cannot connect (EndpointConnectionError)", "cannot connect (ClientConnectorError)")


def test_local_names_with_double_colons_are_files(tmp_path):
    png = encode_image(Image.new("RGB", (2, 2)), "PNG")
    path = write_file(tmp_path / "shot::2024.png", png)
    assert fetch.read_bytes(path) == png
    assert fetch.read_bytes("file://" + path) == png
