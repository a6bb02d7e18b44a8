"""Make URLs, storage options and messages safe to print and store: no credentials, no signatures."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

# storage_options keys whose values are known to be harmless; every other value is saved as '***', at any depth
SAFE_OPTION_KEYS = frozenset({
    "anon", "region_name", "use_ssl", "verify", "endpoint_url", "client_kwargs", "config_kwargs", "s3", "retries",
    "max_attempts", "mode", "addressing_style", "signature_version", "connect_timeout", "read_timeout",
    "max_pool_connections", "requester_pays", "version_aware", "cache_regions", "skip_instance_cache",
    "use_listings_cache", "listings_expiry_time", "default_block_size", "default_fill_cache", "default_cache_type",
    "block_size", "timeout", "project", "consistency", "use_fips_endpoint", "use_dualstack_endpoint", "fixed_upload_size",
})


def redact_secrets(obj: Any, safe: bool = False) -> Any:
    """storage_options as safe to log and save: a value is kept only under a key on SAFE_OPTION_KEYS (URLs
    without `user:pass@` or signatures); every other value, at any depth, becomes '***'."""
    if isinstance(obj, dict):
        return {k: redact_secrets(v, str(k) in SAFE_OPTION_KEYS) for k, v in obj.items()}
    if not safe:
        return "***"
    if isinstance(obj, str):
        return redact_uri(obj)
    return obj if isinstance(obj, (bool, int, float, type(None))) else "***"


# query parameters (lower-cased names containing one of these) that carry credentials in presigned URLs:
# X-Amz-Signature/-Credential/-Security-Token, Azure SAS sig, GCS Signature/GoogleAccessId, access_token, key...
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")  # a URL inside free text
SECRET_PARAMS = ("sig", "token", "credential", "key", "secret", "pass", "auth", "accessid", "session")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _redact_params(text: str) -> str:
    parts = []
    for part in text.split("&"):
        name, eq, _ = part.partition("=")
        secret = eq and any(s in urllib.parse.unquote_plus(name).lower() for s in SECRET_PARAMS)
        parts.append(f"{name}=***" if secret else part)
    return "&".join(parts)


def _redact_one(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep or not SCHEME.fullmatch(scheme):
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


def redact_text(text: str) -> str:
    """Free text (an exception's message) with every URL in it redacted."""
    return _URL.sub(lambda m: redact_uri(m.group(0)), text)
