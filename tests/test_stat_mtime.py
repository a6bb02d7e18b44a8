"""mtime has one timestamp type on every backend: local files (stat and listing), HTTP (Last-Modified), S3."""
import datetime as dt
import functools
import http.server
import os
import re

import pyarrow as pa
from servers import serving

from igpt_batch.inputs.stat import LIST_MIN, stat_one, stat_table, timestamp

ISO_NS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


def seconds(mtime: str) -> float:
    return dt.datetime.fromisoformat(mtime[:26] + "+00:00").timestamp()


def test_timestamp_forms():
    assert timestamp(1_733_385_600_123_456_789) == "2024-12-05T08:00:00.123456789Z"
    assert timestamp(dt.datetime(2024, 12, 5, 9, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))) == \
        "2024-12-05T08:00:00.000005000Z"
    assert timestamp("Thu, 05 Dec 2024 08:00:00 GMT") == timestamp("2024-12-05T08:00:00.000Z") == \
        "2024-12-05T08:00:00.000000000Z"
    assert timestamp(None) is None and timestamp("yesterday") is None


def test_local_http_and_s3_give_one_type(tmp_path, s3_server, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for i in range(LIST_MIN + 1):
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    os.utime(tmp_path / "0.jpg", ns=(1_733_385_600_123_456_789, 1_733_385_600_123_456_789))
    local = [str(tmp_path / f"{i}.jpg") for i in range(LIST_MIN + 1)]
    listed, counts = stat_table(pa.array(local), {}, 10)
    assert counts["lists"] == 1 and listed.column("mtime")[0].as_py() == "2024-12-05T08:00:00.123456789Z"
    assert stat_one(local[0], {}, 10)["mtime"] == "2024-12-05T08:00:00.123456789Z"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    server.RequestHandlerClass.log_message = lambda *a: None
    with serving(server) as base:
        web = stat_one(f"{base}/0.jpg", {}, 10)
    assert web["mtime"] == "2024-12-05T08:00:00.000000000Z" and web["size"] == 1  # Last-Modified: whole seconds
    fs, so = s3_server.fs(), s3_server.storage_options()
    fs.mkdir("igpt-mtime")
    for i in range(LIST_MIN + 1):
        fs.pipe_file(f"igpt-mtime/p/{i}.jpg", b"y" * (i + 1))
    uris = [f"s3://igpt-mtime/p/{i}.jpg" for i in range(LIST_MIN + 1)]
    s3_listed, counts = stat_table(pa.array(uris), so, 10)
    s3_one = stat_one(uris[0], so, 10)
    assert counts["lists"] == 1 and s3_one["mtime"] == s3_listed.column("mtime")[0].as_py()
    every = listed.column("mtime").to_pylist() + [web["mtime"]] + s3_listed.column("mtime").to_pylist()
    assert all(ISO_NS.match(m) for m in every), every
    assert abs(seconds(s3_one["mtime"]) - dt.datetime.now(dt.timezone.utc).timestamp()) < 600
