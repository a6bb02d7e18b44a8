"""One writer per output or store: `_LEASE.json`, taken by an atomic create, refreshed and taken over by
compare-and-swap (run/lease_files.py holds the conditional writes), and a fence every shard commit checks."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from igpt_batch.errors import LeaseError
from igpt_batch.run.lease_files import LEASE, CheckedFile, Conflict, S3File, Unsupported, lease_file

log = logging.getLogger(__name__)
__all__ = ["LEASE", "Fence", "Lease", "check_fence", "describe"]


@dataclass(frozen=True)
class Fence:
    """What a worker needs to refuse a commit under a lost lease: the holder's token, generation and timeout."""

    token: str
    generation: int
    timeout: float

    def record(self) -> dict:
        return {"token": self.token, "generation": self.generation}


def describe(held: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started_at", 0)))
    return f"host {held.get('host')}, pid {held.get('pid')}, started {started}, lease generation {held.get('generation')}"


def check_fence(folder, fence: Fence) -> None:
    """Raise LeaseError unless `fence` is still the folder's live lease (one read; the worker's check before a commit)."""
    held = CheckedFile(folder).read()[0]
    if held is None or held.get("token") != fence.token:
        raise LeaseError(f"lease on {folder.url} lost" + (f" to another job ({describe(held)})" if held else "")
                         + ": this job commits nothing more")
    age = time.time() - held.get("refreshed_at", 0)
    if age > fence.timeout:
        raise LeaseError(f"lease on {folder.url} not refreshed for {age:.0f} s (over run.lease_timeout="
                         f"{fence.timeout:.0f} s): another job may take it over, so this job commits nothing more")


class Lease:
    """One writer at a time: `_LEASE.json` names the holder (host, pid, start, token, generation) and is refreshed by
    compare-and-swap while it runs. A lease not refreshed for `timeout` seconds, or whose holder is a process on this
    host that no longer exists (a killed job), is stale and taken over by compare-and-swap (generation + 1); a live
    one is refused, naming its holder (--overwrite included). A refresh that finds the lease changed means it was
    lost: `lost` says to whom, the main thread is interrupted (when it took the lease), and leaving raises
    LeaseError; workers check `fence` before each commit."""

    def __init__(self, folder, timeout: float, force: bool = False):  # force: ignored (a live lease is never taken)
        self.folder, self.timeout = folder, timeout
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "started_at": time.time()}
        self.file: CheckedFile | None = None
        self.version: str | None = None
        self.generation = 0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interrupt = False

    @property
    def fence(self) -> Fence:
        return Fence(self.me["token"], self.generation, self.timeout)

    def _data(self) -> bytes:
        body = self.me | {"generation": self.generation, "refreshed_at": time.time(), "nonce": uuid.uuid4().hex}
        return json.dumps(body, indent=2, sort_keys=True).encode()

    def _stale(self, held: dict) -> bool:
        if time.time() - held.get("refreshed_at", 0) > self.timeout:
            return True
        if held.get("host") == self.me["host"]:
            try:
                os.kill(int(held.get("pid", 0)), 0)
            except ProcessLookupError:
                return True  # its job was killed on this machine
            except (PermissionError, ValueError, TypeError):
                return False
        return False

    def _take(self) -> None:
        for _ in range(5):  # each lost race re-reads: the winner's lease is then live and refused below
            held, version = self.file.read()
            if held is not None and not self._stale(held):
                age = time.time() - held.get("refreshed_at", 0)
                raise LeaseError(
                    f"{self.folder.url} is in use by another job ({describe(held)}, lease refreshed {age:.0f} s ago); "
                    f"wait for it to finish: --overwrite never takes a live lease (a lease unrefreshed for "
                    f"run.lease_timeout={self.timeout:.0f} s, or whose process on this host is gone, is taken over)")
            self.generation = (held.get("generation") or 0) + 1 if held is not None else 1
            data = self._data()
            try:
                self.version = self.file.create(data) if held is None else self.file.replace(data, version)
            except Conflict:
                continue
            if held is not None:
                log.warning("took over the stale lease on %s (%s)", self.folder.url, describe(held))
            if isinstance(self.file, S3File) and not self.file.probe(self._data()):
                log.warning("%s ignores If-None-Match: the lease falls back to write-then-read-back", self.folder.url)
                self.file = CheckedFile(self.folder)
                self.version = self.file.read()[1]
            return
        raise LeaseError(f"{self.folder.url} was taken by another job starting at the same time")

    def __enter__(self) -> "Lease":
        self.file = lease_file(self.folder)
        try:
            self._take()
        except Unsupported:
            log.warning("%s refuses conditional writes: the lease falls back to write-then-read-back", self.folder.url)
            self.file = CheckedFile(self.folder)
            self._take()
        self._interrupt = threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(target=self._keep, daemon=True, name="igpt-lease")
        self._thread.start()
        return self

    def _keep(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(max(0.2, self.timeout / 4)):
            try:
                self.version = self.file.replace(self._data(), self.version)
                last_ok = time.time()
                continue
            except Conflict:
                held = self.file.read()[0]
                self.lost = f"to another job ({describe(held)})" if held else "(the lease file was removed)"
            except Exception as e:  # a store outage: the next refresh retries, until the lease would be stale
                log.warning("could not refresh the lease on %s: %s", self.folder.url, type(e).__name__)
                if time.time() - last_ok <= self.timeout:
                    continue
                self.lost = f"(not refreshed for over run.lease_timeout={self.timeout:.0f} s)"
            log.error("lost the lease on %s %s: stopping; this job commits nothing more", self.folder.url, self.lost)
            if self._interrupt:
                import _thread

                _thread.interrupt_main()  # the driver stops waiting on shards; __exit__ turns this into LeaseError
            return

    def lost_error(self) -> LeaseError:
        return LeaseError(f"lost the lease on {self.folder.url} {self.lost}: this job committed nothing more and "
                          "wrote no _SUCCESS; shards committed before are kept")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            try:
                self._thread.join()
            except KeyboardInterrupt:  # our own interrupt, landing here: the loss is reported below
                if not self.lost:
                    raise
                self._thread.join()
        if self.lost:
            raise self.lost_error() from None
        try:
            self.file.delete(self.version)  # only if it is still the lease we wrote last
        except Conflict:
            pass
