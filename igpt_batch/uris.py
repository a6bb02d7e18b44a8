"""What a uri names: its scheme, and the local path behind a plain path or a file:// URL."""

from __future__ import annotations

import os
import threading
import urllib.parse

from igpt_batch.redact import SCHEME


def scheme(uri: str) -> str:
    """'s3', 'file', ... ; 'chained' for fsspec's a::b://...; '' for a plain local path (even one holding '::')."""
    head, sep, _ = uri.partition("://")
    if sep and SCHEME.fullmatch(head):
        return head.lower()
    if sep and "::" in head and all(SCHEME.fullmatch(h) for h in head.split("::")):
        return "chained"
    return ""


def local_path(uri: str) -> str | None:
    """The filesystem path of a plain path or a file:// URL, else None. file:// URLs are percent-encoded
    (RFC 8089): that is how a manifest names a non-UTF-8 path."""
    s = scheme(uri)
    if not s:
        return uri
    if s in ("file", "local"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri.split("://", 1)[1]))
    return None


def call_with_deadline(fn, timeout: float):
    """fn() in a daemon thread; TimeoutError when it has not returned within `timeout` seconds (the thread is
    abandoned: its own socket timeouts end it soon after). This bounds any remote call, whatever timeouts it
    does or does not implement; fn's own exception is raised in the caller's thread."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="igpt-deadline", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]
