"""bench/latency_proxy.py against a real SeaweedFS: requests pass through intact, each waits the added latency, and
each is counted by kind and by the process that opened its connection (this one, or a subprocess)."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import S3Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from latency_proxy import ProxyThread, by_kind, classify  # noqa: E402


def test_classify_by_method_and_output_file():
    assert classify("PUT", "/b/out/_plan/part-00001.parquet", {}) == "PUT _plan/"
    assert classify("HEAD", "/b/deep/out/_commits/part-00001.json", {}) == "HEAD _commits/"
    assert classify("GET", "/b/out/errors/part-00001.parquet", {}) == "GET errors/"
    assert classify("PUT", "/b/out/embeddings/part-00001.parquet", {}) == "PUT embeddings/"
    assert classify("GET", "/b/out/_job.json", {}) == "GET _job.json"
    assert classify("HEAD", "/b/out/_SUCCESS", {}) == "HEAD _SUCCESS"
    assert classify("DELETE", "/b/out/_LEASE.json", {}) == "DELETE _LEASE.json"
    assert classify("GET", "/b/manifest.parquet", {}) == "GET other"
    assert classify("GET", "/b", {"list-type": "2", "prefix": "out/_commits/"}) == "LIST _commits/"
    assert classify("GET", "/b/", {"prefix": "out/manifest"}) == "LIST other"
    body = b"<Delete><Object><Key>out/_plan/part-00000.parquet</Key></Object></Delete>"
    assert classify("POST", "/b", {"delete": ""}, body) == "DELETE_MANY _plan/"


CHILD = textwrap.dedent("""
    import json, os, sys
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **json.loads(sys.argv[1]))
    for i in range(3):
        fs.pipe_file(f"igpt-proxy/out/_commits/part-{i:05d}.json", b"{}")
    print(os.getpid(), fs.info("igpt-proxy/out/errors/part-00000.parquet")["size"])
""")


def test_latency_counts_and_attribution(s3_server: S3Server):
    direct = s3_server.fs()
    direct.mkdir("igpt-proxy")
    direct.pipe_file("igpt-proxy/out/errors/part-00000.parquet", b"e" * 761)
    latency = 0.05
    with ProxyThread(s3_server.endpoint, latency) as proxy:
        so = s3_server.storage_options() | {"client_kwargs": {"endpoint_url": proxy.url}}
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **so)
        t0 = time.monotonic()
        for i in range(5):  # one after another: each waits the added latency before it is forwarded
            fs.pipe_file(f"igpt-proxy/out/_plan/part-{i:05d}.parquet", bytes([i]) * 100_000)
        assert time.monotonic() - t0 >= 5 * latency
        assert fs.cat_file("igpt-proxy/out/errors/part-00000.parquet") == b"e" * 761
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(so)], capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
        child_pid, size = map(int, child.stdout.split())
        stats = proxy.stats()
        proxy.reset()
        assert proxy.stats()["requests"] == []
    assert size == 761  # a HEAD's Content-Length came back as the object's size
    for i in range(5):  # what went through the proxy arrived intact (its signatures verified upstream)
        assert direct.cat_file(f"igpt-proxy/out/_plan/part-{i:05d}.parquet") == bytes([i]) * 100_000
    assert by_kind(stats, {os.getpid()}) == {"PUT _plan/": 5, "HEAD errors/": 1, "GET errors/": 1}  # s3fs's cat: HEAD, GET
    assert by_kind(stats, {child_pid}) == {"PUT _commits/": 3, "HEAD errors/": 1}
    assert {int(p) for p in stats["connections"]} == {os.getpid(), child_pid}  # no connection left unattributed
    assert by_kind(stats) == {"PUT _plan/": 5, "GET errors/": 1, "PUT _commits/": 3, "HEAD errors/": 2}
