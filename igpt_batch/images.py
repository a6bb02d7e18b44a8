"""Image input: fetch bytes (fsspec/HTTP, timeout, size cap), decode safely (pixel limit, modes, EXIF), resize like HF."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import io
import os
import socket
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
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


# ----------------------------------------------------------------------------- reading


def _show(uri: str) -> str:
    """The URI as safe to print: no password, no query string (presigned URLs carry signatures)
    and non-UTF-8 path bytes (surrogate escapes) written as backslash escapes."""
    if "://" in uri:
        try:
            p = urllib.parse.urlsplit(uri)
            host = p.hostname or ""
            if p.port:
                host += f":{p.port}"
            if p.username or p.password:
                host = "***@" + host
            uri = f"{p.scheme}://{host}{p.path}" + ("?***" if p.query else "")
        except ValueError:
            pass
    return uri.encode("utf-8", "backslashreplace").decode("utf-8")


def _secrets(opts) -> list[str]:
    """Every string value nested in storage_options (keys, tokens, passwords...)."""
    if isinstance(opts, dict):
        return [s for v in opts.values() for s in _secrets(v)]
    if isinstance(opts, (list, tuple)):
        return [s for v in opts for s in _secrets(v)]
    return [opts] if isinstance(opts, str) and len(opts) >= 4 else []


def _too_large(size: int, max_bytes: int, where: str) -> ImageError:
    return ImageError("read", f"too large: {size} bytes > max_bytes {max_bytes}: {where}")


def _os_error(e: OSError, where: str) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError("read", f"file not found: {where}")
    if isinstance(e, PermissionError):
        return ImageError("read", f"permission denied: {where}")
    if isinstance(e, IsADirectoryError):
        return ImageError("read", f"is a directory: {where}")
    return ImageError("read", f"cannot read {where}: {e.strerror or type(e).__name__}")


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


def _read_http(url: str, opts: dict, timeout: float, max_bytes: int, where: str) -> bytes:
    # Plain urllib: every socket operation is bounded by `timeout`, and read_bytes bounds the total.
    # Only storage_options["headers"] applies to http(s).
    headers = {"User-Agent": "igpt-batch", **(opts.get("headers") or {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _too_large(int(length), max_bytes, where)
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        e.close()
        raise ImageError("read", f"HTTP {e.code} {e.reason}: {where}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
        raise ImageError("read", f"cannot connect: {e.reason}: {where}") from None
    except (TimeoutError, socket.timeout):
        raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
    except (OSError, http.client.HTTPException) as e:
        raise ImageError("read", f"HTTP read failed ({type(e).__name__}: {e}): {where}") from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, where)
    return data


def _read_fsspec(uri: str, opts: dict, timeout: float, max_bytes: int, where: str) -> bytes:
    import fsspec  # imported here so local-only use never pays for it

    fs, path = fsspec.core.url_to_fs(uri, **opts)
    try:
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)  # most filesystems learn it from the listing/HEAD
            if size is not None and size > max_bytes:
                raise _too_large(size, max_bytes, where)
            data = f.read(max_bytes + 1)
    except (TimeoutError, asyncio.TimeoutError):
        raise ImageError("read", f"timed out after {timeout:g}s: {where}") from None
    except OSError as e:
        raise _os_error(e, where) from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, where)
    return data


def _with_deadline(fn, timeout: float, where: str):
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
        raise ImageError("read", f"timed out after {timeout:g}s: {where}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_bytes(
    uri: str, storage_options: dict | None = None, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """Read a whole object from a local path, file://, http(s):// or any fsspec URL (s3://, gs://, memory://...).

    Raises ImageError("read", reason) for missing files, permission errors, directories, objects
    over max_bytes (checked from the size first, and the read itself is capped), HTTP errors and
    timeouts. Messages never contain storage_options values or URL query strings.
    """
    opts = dict(storage_options or {})
    where = _show(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri and "::" not in uri else ""
    try:
        if "://" not in uri and "::" not in uri:
            return _read_local(uri, max_bytes, where)
        if scheme in ("file", "local"):
            # file:// URLs are percent-encoded (RFC 8089): that is how a manifest names a non-UTF-8 path
            return _read_local(os.fsdecode(urllib.parse.unquote_to_bytes(uri.split("://", 1)[1])), max_bytes, where)
        if scheme in ("http", "https"):
            return _with_deadline(lambda: _read_http(uri, opts, timeout, max_bytes, where), timeout, where)
        return _with_deadline(lambda: _read_fsspec(uri, opts, timeout, max_bytes, where), timeout, where)
    except ImageError as e:
        reason = e.reason
        for secret in _secrets(opts):
            reason = reason.replace(secret, "***")
        raise ImageError("read", reason) from None


# ----------------------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is dropped (as a plain .convert("RGB") does), not composited."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):
        # 16-bit (I;16, I;16B, ...) and 32-bit I (how some 16-bit files load): scale 0..65535 to
        # 0..255 by /257 with rounding; PIL's own convert("L") would clip everything above 255.
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        g = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), mode="RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in img.info):
        # Via RGBA so PIL does not warn about palette transparency; the colours are the palette's.
        img = img.convert("RGBA")
    return img.convert("RGB")  # L, LA, RGBA, P, CMYK, YCbCr, 1, F (clipped to 0..255), ...


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes -> fully loaded RGB PIL image, or ImageError("decode", reason).

    - Size limit: width*height from the header is checked against max_pixels before any pixel
      is decoded. PIL's own global bomb limit (Image.MAX_IMAGE_PIXELS, left untouched because
      decoding runs in threads) still applies; its DecompressionBombError (and the warning, if
      warnings are errors) becomes ImageError too.
    - EXIF orientation is applied; animated GIF/WebP give their first frame.
    - Alpha (RGBA, LA, palette transparency) is dropped, exactly like img.convert("RGB"), the usual
      way images are fed to HF processors (which reject 4-channel input). Transparent pixels
      therefore show their stored colour.
    - 16-bit grayscale is scaled 0..65535 -> 0..255 (not clipped); CMYK/grayscale/palette convert.
    - draft_size: opt-in fast path for JPEGs at least 2x larger than draft_size on both sides:
      libjpeg decodes at 1/2, 1/4 or 1/8 scale (still >= draft_size). This is approximate
      (slightly different pixels), so callers leave it off unless speed matters more.
    The result's info["source_size"] is the full (width, height) after EXIF rotation, even when
    draft decoding made the pixel array smaller.
    """
    if not data:
        raise ImageError("decode", "empty data (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decode", f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("decode", f"not a recognised image format ({len(data)} bytes)") from None
    except Exception as e:
        raise ImageError("decode", f"cannot open image: {type(e).__name__}: {e}") from None
    try:
        w, h = img.size  # from the header only; nothing decoded yet
        if w * h > max_pixels:
            raise ImageError("decode", f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        if w < 1 or h < 1:
            raise ImageError("decode", f"image has no pixels: {w}x{h}")
        if draft_size and img.format == "JPEG" and min(w, h) >= 2 * draft_size:
            img.draft("RGB", (draft_size, draft_size))
        try:
            img.load()  # forces a full decode, so truncated/corrupt data fails here
        except Exception as e:
            raise ImageError("decode", f"corrupt or truncated image: {type(e).__name__}: {e}") from None
        loaded = img.size
        try:
            oriented = ImageOps.exif_transpose(img)  # always a new image
        except Exception:  # malformed EXIF is not worth losing the image over
            oriented = img.copy()
        swapped = oriented.size == loaded[::-1] and loaded[0] != loaded[1]
        try:
            rgb = _to_rgb(oriented)
        except Exception as e:
            raise ImageError("decode", f"cannot convert {oriented.mode} image to RGB: {e}") from None
        if rgb is img:
            rgb = img.copy()
        rgb.info["source_size"] = (h, w) if swapped else (w, h)
        return rgb
    finally:
        img.close()


def resize(img: Image.Image, n_px: int) -> np.ndarray:
    """RGB PIL image -> uint8 (n_px, n_px, 3), exactly as ImageGPTImageProcessor resizes.

    HF (PilBackend.resize -> image_transforms.resize) turns the uint8 array back into a PIL image
    and calls image.resize((width, height), resample=BILINEAR, reducing_gap=None): a plain
    square resize (aspect ratio not kept, no crop), PIL's antialiased bilinear, uint8 in and out.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    out = img.resize((n_px, n_px), resample=Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(out, dtype=np.uint8)


@dataclass(frozen=True)
class Loaded:
    """One input image ready for tokenisation, with what the output records about its source."""

    rgb: np.ndarray  # uint8 (n_px, n_px, 3)
    width: int  # source size after EXIF rotation
    height: int
    sha256: str  # of the source bytes: the content identity used by `refresh`


def load(
    uri: str,
    n_px: int,
    storage_options: dict | None = None,
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = False,
) -> Loaded:
    """read_bytes -> sha256 -> decode -> resize."""
    data = read_bytes(uri, storage_options, timeout=timeout, max_bytes=max_bytes)
    img = decode(data, max_pixels=max_pixels, draft_size=n_px if draft else None)
    width, height = img.info.get("source_size", img.size)
    return Loaded(resize(img, n_px), width, height, hashlib.sha256(data).hexdigest())


def load_rgb(uri: str, n_px: int, storage_options: dict | None = None, **kw) -> tuple[np.ndarray, int, int]:
    """load() without the hash: (uint8 (n_px, n_px, 3), source width, source height after EXIF)."""
    got = load(uri, n_px, storage_options, **kw)
    return got.rgb, got.width, got.height
