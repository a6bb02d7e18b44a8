"""HTTP(S) reads through one kept urllib3 client: retries with backoff, Retry-After, a per-host limit."""
from __future__ import annotations

import threading

from igpt_batch.errors import ImageError, too_large

_POOLS: dict[int, object] = {}  # one kept urllib3 pool manager per process (per host_connections)
_POOLS_LOCK = threading.Lock()
RETRY_STATUS = (429, 500, 502, 503, 504)
RETRY_AFTER_MAX_S = 10  # a server's Retry-After is honoured up to this (and up to the read timeout)
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0  # exponential backoff between retries, plus up to 50% jitter


def _pool(host_connections: int):
    """The process's kept HTTP client: at most `host_connections` connections per host (further reads wait)."""
    import urllib3

    with _POOLS_LOCK:
        if host_connections not in _POOLS:
            _POOLS[host_connections] = urllib3.PoolManager(num_pools=64, maxsize=host_connections, block=True)
        return _POOLS[host_connections]


def _retry(retries: int, timeout: float):
    """urllib3's Retry: 429, 5xx and connection resets with backoff and jitter, Retry-After honoured but capped;
    refused connections and read timeouts are not retried (a dead host would only cost more time)."""
    from urllib3.exceptions import ReadTimeoutError
    from urllib3.util.retry import Retry

    class _Retry(Retry):
        def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
            if isinstance(error, ReadTimeoutError):
                raise error
            return super().increment(method, url, response, error, _pool, _stacktrace)

    return _Retry(total=None, connect=False, read=retries, status=retries, other=0, redirect=5,
                  status_forcelist=RETRY_STATUS, backoff_factor=BACKOFF_S, backoff_max=BACKOFF_MAX_S,
                  backoff_jitter=BACKOFF_S / 2, raise_on_status=False, respect_retry_after_header=True,
                  retry_after_max=max(1, int(min(RETRY_AFTER_MAX_S, timeout))))


def read_http(url: str, opts: dict, timeout: float, max_bytes: int, where: str, retries: int = 0,
               host_connections: int = 4, counter: list | None = None) -> bytes:
    """GET through the kept urllib3 client (retries, per-host limit); every socket operation is bounded by
    `timeout` and the read by max_bytes. Only storage_options["headers"] applies to http(s)."""
    import urllib3
    from urllib3 import exceptions as u3

    from igpt_batch import __version__

    headers = {"User-Agent": f"igpt-batch/{__version__}", **(opts.get("headers") or {})}
    url = _basic_auth(url, headers)
    t = urllib3.Timeout(connect=timeout, read=timeout)
    try:
        resp = _pool(host_connections).request("GET", url, headers=headers, timeout=t, retries=_retry(retries, timeout),
                                               preload_content=False, pool_timeout=timeout)
    except u3.MaxRetryError as e:  # resets until the retries ran out
        _count(counter, retries)
        raise ImageError("read", f"HTTP read failed ({type(e.reason).__name__}): {where}") from None
    except u3.NewConnectionError:  # a subclass of ConnectTimeoutError: first
        raise ImageError("read", f"cannot connect (connection refused): {where}") from None
    except (u3.TimeoutError, u3.EmptyPoolError):
        raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
    except u3.LocationValueError as e:  # a redirect to file://, ftp://...: never followed
        raise ImageError("read", f"cannot read (redirect refused: {type(e).__name__}): {where}") from None
    except (u3.HTTPError, OSError) as e:
        raise ImageError("read", f"HTTP read failed ({type(e).__name__}): {where}") from None
    _count(counter, len(resp.retries.history) if resp.retries else 0)
    done = False
    try:
        if resp.status >= 400:
            raise ImageError("read", f"HTTP {resp.status} {resp.reason}: {where}")
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise too_large(int(length), max_bytes, where)
        data = resp.read(max_bytes + 1)
        done = len(data) <= max_bytes
    except u3.ReadTimeoutError:
        raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
    except (u3.HTTPError, OSError) as e:
        raise ImageError("read", f"HTTP read failed ({type(e).__name__}): {where}") from None
    finally:
        if not done:  # an error, or a body not read to its end: this connection is not reused...
            resp.close()
        resp.release_conn()  # ...but its slot goes back to the blocking pool, or the host dies after a few errors
    if not done:
        raise too_large(len(data), max_bytes, where)
    return data


def _basic_auth(url: str, headers: dict) -> str:
    """`user:pass@` in the URL is sent as HTTP Basic auth (percent-decoded, as curl does) and taken out of the URL;
    urllib3 drops the header on a redirect to another host."""
    import urllib.parse

    from urllib3.util import make_headers, parse_url

    u = parse_url(url)
    if not u.auth:
        return url
    user, _, password = u.auth.partition(":")
    headers.update(make_headers(basic_auth=f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"))
    return u._replace(auth=None).url


def _count(counter: list | None, n: int) -> None:
    if counter is not None:
        counter.append(n)
