"""The lease file's conditional writes: create if absent, replace or delete if unchanged, on local disk and S3.

Local disk: the create is a hard link of a complete temp file (fails if the name exists, like O_EXCL), and every
change runs under flock on the folder, so a replace or delete compares the bytes it last saw. S3: `If-None-Match: *`
on create and `If-Match: <ETag>` on every later write (SeaweedFS and AWS S3 enforce both). A store with neither
(another fsspec protocol, a local filesystem without flock, an S3 store that ignores the headers, found by a probe
at start) falls back to write-then-read-back, which two starters that interleave can both pass; a warning says so.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid

log = logging.getLogger(__name__)
LEASE = "_LEASE.json"


class Conflict(Exception):
    """A conditional write lost: the file exists (create) or changed since it was read (replace, delete)."""


class Unsupported(Exception):
    """The store refused a conditional header it does not implement."""


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes) -> dict:
    try:
        held = json.loads(data)
    except ValueError:
        held = None
    return held if isinstance(held, dict) else {}  # a garbled lease holds nothing: it is stale and taken over


class CheckedFile:
    """The documented fallback: read, write, read back. Interleaved starters can both pass; the refresh sees a loss."""

    enforced = False

    def __init__(self, folder, name: str = LEASE):
        self.folder, self.name, self.path = folder, name, folder.path(name)

    def read(self) -> tuple[dict | None, str | None]:
        try:
            data = self.folder.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return _decode(data), _version(data)

    def _put(self, data: bytes) -> str:
        self.folder.write_bytes(self.name, data)
        held, version = self.read()
        sent = json.loads(data)
        key = "token" if "token" in sent else "nonce"  # the lease's token; a file created once (a marker) has a nonce
        if held is None or held.get(key) != sent[key]:
            raise Conflict()
        return version

    def create(self, data: bytes) -> str:
        if self.read()[0] is not None:
            raise Conflict()
        return self._put(data)

    def replace(self, data: bytes, version: str) -> str:
        if self.read()[1] != version:
            raise Conflict()
        return self._put(data)

    def delete(self, version: str) -> None:
        if self.read()[1] == version:
            self.folder.fs.rm(self.path)


class LocalFile(CheckedFile):
    """Local disk: create by link (atomic, fails if present), replace and delete compare under flock on the folder."""

    enforced = True

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if we die: never stale
            yield
        finally:
            os.close(fd)

    def _write_new(self, data: bytes, replace: bool) -> str:
        d, name = os.path.split(self.path)
        tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")  # the name write_bytes' temp files have: swept
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if replace:
                os.replace(tmp, self.path)
            else:
                os.link(tmp, self.path)  # FileExistsError if anyone created it first
        except FileExistsError:
            raise Conflict() from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return _version(data)

    def create(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._locked():
            return self._write_new(data, replace=False)

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            if self.read()[1] != version:
                raise Conflict()
            return self._write_new(data, replace=True)

    def delete(self, version: str) -> None:
        with self._locked():
            if self.read()[1] == version:
                os.unlink(self.path)


class S3File(CheckedFile):
    """S3: `If-None-Match: *` creates, `If-Match: <ETag>` replaces; content and ETag come from one GET."""

    enforced = True

    def __init__(self, folder, name: str = LEASE):
        super().__init__(folder, name)
        self.bucket, self.key, _ = folder.fs.split_path(self.path)

    def _call(self, coro_fn):
        from fsspec.asyn import sync

        return sync(self.folder.fs.loop, coro_fn)

    def read(self) -> tuple[dict | None, str | None]:
        async def get():
            resp = await self.folder.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]
        try:
            data, etag = self._call(get)
        except FileNotFoundError:
            return None, None
        return _decode(data), etag

    def _put(self, data: bytes, **condition) -> str:
        try:
            return self.folder.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except (OSError, FileExistsError) as e:
            resp = getattr(e.__cause__, "response", None) or {}
            code = resp.get("Error", {}).get("Code")
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                # a retried PUT whose first try landed also fails its condition: ours is not a loss
                held, etag = self.read()
                if held is not None and held.get("nonce") == json.loads(data)["nonce"]:
                    return etag
                raise Conflict() from None
            if code == "NotImplemented" or status == 501:
                raise Unsupported() from None
            raise

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        held, etag = self.read()
        if etag == version:
            self.folder.fs.rm(self.path)

    def probe(self, data: bytes) -> bool:
        """Whether the store enforces If-None-Match: a second create of our lease (a new nonce) must fail (one request;
        where it does not fail, it only rewrote our own lease)."""
        try:
            self.create(data)
        except Conflict:
            return True
        return False


def lease_file(folder, name: str = LEASE) -> CheckedFile:
    """The conditional writes of `name` (the lease, or a file created once) in `folder`, by its protocol."""
    protocol = folder.fs.protocol
    protocols = protocol if isinstance(protocol, tuple) else (protocol,)
    if "file" in protocols or "local" in protocols:
        try:
            with LocalFile(folder)._locked() if os.path.isdir(folder.root) else contextlib.nullcontext():
                pass
            return LocalFile(folder, name)
        except OSError as e:  # a network filesystem without flock
            log.warning("%s has no file locks (%s): the lease falls back to write-then-read-back", folder.url, e)
            return CheckedFile(folder, name)
    if {"s3", "s3a"} & set(protocols):
        return S3File(folder, name)
    log.warning("%s: no conditional writes on %s; the lease falls back to write-then-read-back, which two jobs "
                "starting at the same moment can both pass", folder.url, protocols[0])
    return CheckedFile(folder, name)
