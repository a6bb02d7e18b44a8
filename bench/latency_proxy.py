#!/usr/bin/env python
"""A latency proxy for object storage: every HTTP request is forwarded to an S3 endpoint after a fixed delay,
counted by kind, and attributed to the process that opened its connection.

Kind: the method (LIST for a bucket listing) and the output file the key names: `_plan/`, `_commits/`, `errors/`,
`embeddings/`, `_job.json`, `_SUCCESS`, `_LEASE.json`, or `other`. Process: the client's source port is looked up in
/proc/net/tcp{,6} (its socket inode), and the inode in /proc/PID/fd, once per connection (pid 0: not found, e.g. a
client in another network namespace). Requests are forwarded byte for byte, the Host header included, so SigV4
signatures made for the proxy's address still verify upstream.

    python bench/latency_proxy.py --upstream http://127.0.0.1:8333 --latency-ms 25   # prints "port: N"

Counts: GET /__proxy__/stats (JSON), POST /__proxy__/reset; these are answered by the proxy, never forwarded
(no bucket name starts with an underscore).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import threading
import urllib.request
from collections import Counter
from urllib.parse import unquote

from aiohttp import ClientSession, TCPConnector, web
from yarl import URL

CONTROL = "/__proxy__/"
FOLDERS = ("_plan", "_commits", "errors", "embeddings")
FILES = ("_job.json", "_SUCCESS", "_LEASE.json")
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}


def key_kind(key: str) -> str:
    """The output file a key (or a listing prefix) names, by its first telling path segment."""
    for part in key.split("/"):
        if part in FOLDERS:
            return part + "/"
        if part in FILES:
            return part
    return "other"


def classify(method: str, path: str, query, body: bytes = b"") -> str:
    """'PUT _plan/', 'HEAD _commits/', 'LIST errors/', 'DELETE_MANY _plan/' (by its first key), 'GET other':
    path-style /bucket/key."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    if method == "GET" and not key and ("list-type" in query or "prefix" in query or "delimiter" in query):
        return f"LIST {key_kind(query.get('prefix', ''))}"
    if method == "POST" and not key and "delete" in query:
        first = re.search(rb"<Key>([^<]*)</Key>", body)
        return f"DELETE_MANY {key_kind(first.group(1).decode() if first else '')}"
    return f"{method} {key_kind(key)}"


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the TCP socket from local_port to remote_port (the client's end of a connection to us)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == local_port and int(fields[2].rsplit(":", 1)[1], 16) == remote_port
                    and fields[9] != "0"):
                return int(fields[9])
    return None


def inode_owner(inode: int, first: list[int] = ()) -> int | None:
    """The pid holding socket `inode` open: the pids in `first` are tried before every other (newest first)."""
    target = f"socket:[{inode}]"
    others = sorted((int(p) for p in os.listdir("/proc") if p.isdigit()), reverse=True)
    for pid in [*first, *others]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


class LatencyProxy:
    """The proxy: `await start()` (returns the port), `stats()`, `reset()`, `await stop()`."""

    def __init__(self, upstream: str, latency_s: float, host: str = "127.0.0.1", port: int = 0):
        self.upstream, self.latency_s, self.host, self.port = upstream.rstrip("/"), latency_s, host, port
        self.requests: Counter = Counter()  # (pid, kind) -> n
        self.connections: Counter = Counter()  # pid -> connections opened
        self._owners: dict = {}  # connection (transport id, peer) -> pid
        self._recent: list[int] = []  # pids seen lately: looked at first

    async def start(self) -> int:
        self.session = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
        app = web.Application(client_max_size=2**31)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    def stats(self) -> dict:
        return {"latency_ms": self.latency_s * 1000,
                "requests": [[pid, kind, n] for (pid, kind), n in sorted(self.requests.items())],
                "connections": {str(pid): n for pid, n in sorted(self.connections.items())}}

    def reset(self) -> None:
        self.requests.clear()
        self.connections.clear()

    async def _owner(self, request: web.Request) -> int:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        key = (id(request.transport), peer)
        if key not in self._owners:
            pid = None
            if peer:
                loop = asyncio.get_running_loop()
                pid = await loop.run_in_executor(None, self._lookup, peer[1])
            self._owners[key] = pid or 0
            self.connections[pid or 0] += 1
        return self._owners[key]

    def _lookup(self, client_port: int) -> int | None:
        inode = socket_inode(client_port, self.port)
        pid = inode_owner(inode, list(self._recent)) if inode else None
        if pid and pid not in self._recent:
            self._recent = [pid, *self._recent[:63]]
        return pid

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(CONTROL):
            if request.path == CONTROL + "reset" and request.method == "POST":
                self.reset()
            return web.json_response(self.stats())
        body = await request.read()
        pid = await self._owner(request)
        self.requests[(pid, classify(request.method, request.path, request.query, body))] += 1
        await asyncio.sleep(self.latency_s)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        try:
            async with self.session.request(
                    request.method, URL(self.upstream + request.raw_path, encoded=True), headers=headers, data=body,
                    allow_redirects=False, skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
            ) as up:
                data = await up.read()
                out = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        out.headers.add(k, v)
                out.content_length = int(up.headers.get("Content-Length", len(data)))
        except OSError as e:
            return web.Response(status=502, text=f"latency proxy: upstream {self.upstream}: {type(e).__name__}")
        await out.prepare(request)
        if request.method != "HEAD":
            await out.write(data)
        await out.write_eof()
        return out


class ProxyThread:
    """The proxy on its own event loop in a background thread, as a context manager: `with ProxyThread(...) as p:`
    gives p.url, p.stats(), p.reset()."""

    def __init__(self, upstream: str, latency_s: float):
        self.proxy = LatencyProxy(upstream, latency_s)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="latency-proxy")

    def __enter__(self) -> "ProxyThread":
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def stats(self) -> dict:
        return fetch_stats(self.url)

    def reset(self) -> None:
        fetch_stats(self.url, reset=True)


def fetch_stats(url: str, reset: bool = False) -> dict:
    """A proxy's counts, over HTTP (from any process); with reset, zeroed after they are read."""
    req = urllib.request.Request(url.rstrip("/") + CONTROL + ("reset" if reset else "stats"),
                                 method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def by_kind(stats: dict, pids=None) -> Counter:
    """Requests by kind, of the given pids (all when None)."""
    out = Counter()
    for pid, kind, n in stats["requests"]:
        if pids is None or pid in pids:
            out[kind] += n
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="the S3 endpoint, e.g. http://127.0.0.1:8333")
    p.add_argument("--latency-ms", type=float, default=25.0, help="added to every request (default 25)")
    p.add_argument("--port", type=int, default=0, help="where to listen (default: any free port)")
    args = p.parse_args(argv)

    async def serve() -> None:
        proxy = LatencyProxy(args.upstream, args.latency_ms / 1000, port=args.port)
        print(f"port: {await proxy.start()}", flush=True)
        await asyncio.Event().wait()  # until killed

    asyncio.run(serve())


if __name__ == "__main__":
    main()
