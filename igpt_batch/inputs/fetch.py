"""Fetch image bytes (local, file://, http(s), any fsspec URL) with a deadline and a size cap; safe messages."""

from __future__ import annotations

import asyncio
import os
import stat

from igpt_batch import uris
from igpt_batch.config import DEFAULT_MAX_BYTES
from igpt_batch.errors import ImageError, too_large
from igpt_batch.redact import redact_uri, scrub_secrets
from igpt_batch.uris import call_with_deadline


def _os_error(e: OSError, where: str) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError("read", f"file not found: {where}")
    if isinstance(e, PermissionError):
        return ImageError("read", f"permission denied: {where}")
    if isinstance(e, IsADirectoryError):
        return ImageError("read", f"is a directory: {where}")
    return ImageError("read", f"cannot read ({e.strerror or type(e).__name__}): {where}")


def _read_local(path: str, max_bytes: int, where: str) -> bytes:
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device could block forever
            raise ImageError("read", f"not a regular file: {where}")
        if st.st_size > max_bytes:
            raise too_large(st.st_size, max_bytes, where)
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise _os_error(e, where) from None
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes, where)
    return data


def _read_fsspec(uri: str, opts: dict, timeout: float, max_bytes: int, where: str) -> bytes:
    import fsspec  # imported here so local-only use never pays for it

    try:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)  # most filesystems learn it from the listing/HEAD
            if size is not None and size > max_bytes:
                raise too_large(size, max_bytes, where)
            data = f.read(max_bytes + 1)
    except (TimeoutError, asyncio.TimeoutError):
        raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
    except ImageError:
        raise
    except Exception as e:
        raise _fsspec_error(e, uri, where) from None
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes, where)
    return data


def _fsspec_error(e: Exception, uri: str, where: str) -> ImageError:
    """Any failure of an fsspec filesystem as a read error: all of them are about getting the bytes."""
    name = type(e).__name__
    if isinstance(e, (ValueError, ImportError)) and "protocol" in str(e).lower():
        return ImageError("read", f"unknown protocol ({uri.partition('://')[0]}): {where}")
    if isinstance(e, PermissionError) or any(s in name for s in ("Credential", "AccessDenied", "Auth")):
        return ImageError("read", f"access denied ({name}: check the storage credentials): {where}")
    if isinstance(e, ConnectionError) or "Connect" in name:
        return ImageError("read", f"cannot connect ({name}): {where}")
    if isinstance(e, OSError):
        return _os_error(e, where)
    return ImageError("read", f"cannot read ({name}): {where}")


def _with_deadline(fn, timeout: float, where: str, per_try: float | None = None):
    """fn() bounded by `timeout` seconds; a read that has not answered by then is a read error."""
    try:
        return call_with_deadline(fn, timeout)
    except TimeoutError:
        raise ImageError("read", f"timed out after {per_try or timeout:g}s: {where}") from None


def read_bytes(
    uri: str, storage_options: dict | None = None, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_BYTES,
    retries: int = 2, host_connections: int = 4, counter: list | None = None,
) -> bytes:
    """Read a whole object from a local path, file://, http(s):// or any fsspec URL (s3://, gs://, memory://...).

    Raises ImageError("read", reason) for missing files, permission errors, directories, objects
    over max_bytes (checked from the size first, and the read itself is capped), HTTP errors and
    timeouts; also unknown protocols, missing credentials and refused connections. A path without
    a scheme (or a file:// URL) is a local file even when its name holds '::' (fsspec's URL chaining).
    Messages never contain storage_options values, URL passwords or signatures (see redact_uri).
    http(s) reads retry 429, 5xx and connection resets `retries` times (counted into `counter`), at most
    `host_connections` at a time per host in this process; redirects to other schemes are refused.
    """
    opts = dict(storage_options or {})
    where = redact_uri(uri)
    scheme = uris.scheme(uri)
    try:
        path = uris.local_path(uri)
        if path is not None:
            return _read_local(path, max_bytes, where)
        if scheme in ("http", "https"):
            from igpt_batch.inputs.http_fetch import BACKOFF_MAX_S, RETRY_AFTER_MAX_S, read_http

            deadline = timeout + retries * (2 * timeout + RETRY_AFTER_MAX_S + BACKOFF_MAX_S)  # every try, every wait
            return _with_deadline(lambda: read_http(uri, opts, timeout, max_bytes, where, retries, host_connections,
                                                     counter), deadline, where, timeout)
        return _with_deadline(lambda: _read_fsspec(uri, opts, timeout, max_bytes, where), timeout, where)
    except ImageError as e:
        raise ImageError("read", scrub_secrets(e.reason, opts)) from None
    except Exception as e:  # anything else still failed to get the bytes
        raise ImageError("read", f"cannot read ({type(e).__name__}): {where}") from None
