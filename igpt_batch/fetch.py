"""Fetch image bytes (local, file://, http(s), any fsspec URL) with a deadline and a size cap; safe messages."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
import urllib.parse

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ImageError(Exception):
    """A per-image failure. stage is "read" or "decode"; str(e) is the readable reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason

    def __reduce__(self):
        # Default exception pickling re-calls __init__(*self.args) = (reason,) and fails;
        # Ray ships these between processes.
        return (ImageError, (self.stage, self.reason))


# query parameters (lower-cased names containing one of these) that carry credentials in presigned URLs:
# X-Amz-Signature/-Credential/-Security-Token, Azure SAS sig, GCS Signature/GoogleAccessId, access_token, key...
SECRET_PARAMS = ("sig", "token", "credential", "key", "secret", "pass", "auth", "accessid", "session")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _redact_params(text: str) -> str:
    parts = []
    for part in text.split("&"):
        name, eq, _ = part.partition("=")
        secret = eq and any(s in urllib.parse.unquote_plus(name).lower() for s in SECRET_PARAMS)
        parts.append(f"{name}=***" if secret else part)
    return "&".join(parts)


def _redact_one(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return uri
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:  # user:pass@host -> host
        netloc = netloc.rpartition("@")[2]
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    return f"{scheme}://{netloc}{slash}{path}{q}{_redact_params(query)}{hash_}{_redact_params(fragment)}"


def redact_uri(uri: str) -> str:
    """The uri as safe to store or print: `user:pass@` removed, credential-carrying query values
    (presigned-URL signatures, tokens, keys) replaced by '***', every part of a chained fsspec URL
    (a::b) alike, and non-UTF-8 path bytes (surrogate escapes) written as backslash escapes."""
    uri = "::".join(_redact_one(part) for part in uri.split("::"))
    return uri.encode("utf-8", "backslashreplace").decode("utf-8")


def _secrets(opts) -> list[str]:
    """Every string value nested in storage_options (keys, tokens, passwords...)."""
    if isinstance(opts, dict):
        return [s for v in opts.values() for s in _secrets(v)]
    if isinstance(opts, (list, tuple)):
        return [s for v in opts for s in _secrets(v)]
    return [opts] if isinstance(opts, str) and len(opts) >= 4 else []


def scrub_secrets(text: str, storage_options: dict | None) -> str:
    """text with every string value of storage_options (4 characters or more) replaced by '***'."""
    for secret in sorted(_secrets(storage_options or {}), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# (pattern at the start of a reason, class): reasons name their uri last, so a class never holds a path
_REASON_CLASSES = [(re.compile(p), t) for p, t in (
    (r"too large: \d+ bytes > max_bytes (\d+)", r"too large (over max_bytes \1)"),
    (r"image too large \(decompression bomb\).*?(--max-pixels \d+)", r"decompression bomb (over \1)"),
    (r"image too large \(decompression bomb\)", "decompression bomb"),
    (r"(HTTP \d{3})\b", r"\1"),
    (r"(HTTP read failed|cannot read|cannot open image) \((\w+)", r"\1 (\2)"),
    (r"(timed out after [\d.]+s)", r"\1"),
    (r"(cannot connect|access denied|unknown protocol) \(([^)]*)\)", r"\1 (\2)"),
    (r"cannot convert (\w+) image to RGB", r"cannot convert \1 image to RGB"),
    (r"([a-z][a-z ]*[a-z])\b", r"\1"),  # file not found, permission denied, empty data, not a recognised ...
    (r"([A-Za-z_]\w*)", r"\1"),  # an exception's type name
)]


def reason_class(reason: str) -> str:
    """A per-row error reason reduced to its kind, without paths, URLs or sizes, for grouping
    (e.g. 'file not found', 'HTTP 404', 'timed out after 30s', 'decompression bomb (over --max-pixels N)')."""
    for pattern, template in _REASON_CLASSES:
        m = pattern.match(reason)
        if m:
            return m.expand(template)
    return "other"


def _too_large(size: int, max_bytes: int, where: str) -> ImageError:
    return ImageError("read", f"too large: {size} bytes > max_bytes {max_bytes}: {where}")


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
            raise _too_large(st.st_size, max_bytes, where)
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise _os_error(e, where) from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, where)
    return data


def _read_fsspec(uri: str, opts: dict, timeout: float, max_bytes: int, where: str) -> bytes:
    import fsspec  # imported here so local-only use never pays for it

    try:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)  # most filesystems learn it from the listing/HEAD
            if size is not None and size > max_bytes:
                raise _too_large(size, max_bytes, where)
            data = f.read(max_bytes + 1)
    except (TimeoutError, asyncio.TimeoutError):
        raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
    except ImageError:
        raise
    except Exception as e:
        raise _fsspec_error(e, uri, where) from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, where)
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
    """Run fn() in a daemon thread and give up after `timeout` seconds (the thread is abandoned;
    its own socket timeouts end it soon after). This bounds any remote filesystem, whatever
    timeouts it does or does not implement."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="igpt-read", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ImageError("read", f"timed out after {per_try or timeout:g}s: {where}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _scheme(uri: str) -> str:
    """'s3', 'file', ... ; 'chained' for fsspec's a::b://...; '' for a plain local path (even one holding '::')."""
    head, sep, _ = uri.partition("://")
    if sep and _SCHEME.fullmatch(head):
        return head.lower()
    if sep and "::" in head and all(_SCHEME.fullmatch(h) for h in head.split("::")):
        return "chained"
    return ""


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
    scheme = _scheme(uri)
    try:
        if not scheme:
            return _read_local(uri, max_bytes, where)
        if scheme in ("file", "local"):
            # file:// URLs are percent-encoded (RFC 8089): that is how a manifest names a non-UTF-8 path
            return _read_local(os.fsdecode(urllib.parse.unquote_to_bytes(uri.split("://", 1)[1])), max_bytes, where)
        if scheme in ("http", "https"):
            from .http_fetch import BACKOFF_MAX_S, RETRY_AFTER_MAX_S, read_http

            deadline = timeout + retries * (2 * timeout + RETRY_AFTER_MAX_S + BACKOFF_MAX_S)  # every try, every wait
            return _with_deadline(lambda: read_http(uri, opts, timeout, max_bytes, where, retries, host_connections,
                                                     counter), deadline, where, timeout)
        return _with_deadline(lambda: _read_fsspec(uri, opts, timeout, max_bytes, where), timeout, where)
    except ImageError as e:
        raise ImageError("read", scrub_secrets(e.reason, opts)) from None
    except Exception as e:  # anything else still failed to get the bytes
        raise ImageError("read", f"cannot read ({type(e).__name__}): {where}") from None
