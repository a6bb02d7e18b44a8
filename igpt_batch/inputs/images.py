"""Image input: decode safely (pixel limit, modes, EXIF) and resize like HF; fetching lives in fetch.py."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from igpt_batch.config import DEFAULT_MAX_PIXELS
from igpt_batch.errors import ImageError
from igpt_batch.inputs.fetch import DEFAULT_MAX_BYTES, read_bytes

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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # over Pillow's own limit
        raise ImageError("decode", f"image too large (decompression bomb): over --max-pixels {max_pixels} "
                                   f"or Pillow's limit ({e})") from None
    except UnidentifiedImageError:
        raise ImageError("decode", f"not a recognised image format ({len(data)} bytes)") from None
    except Exception as e:
        raise ImageError("decode", f"cannot open image: {type(e).__name__}: {e}") from None
    try:
        w, h = img.size  # from the header only; nothing decoded yet
        if w * h > max_pixels:
            raise ImageError("decode", f"image too large (decompression bomb): {w}x{h} = {w * h} pixels "
                                       f"> --max-pixels {max_pixels}")
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
    retries: int = 2,
    host_connections: int = 4,
    counter: list | None = None,
) -> Loaded:
    """read_bytes -> sha256 -> decode -> resize (http(s) retries are appended to `counter`)."""
    data = read_bytes(uri, storage_options, timeout=timeout, max_bytes=max_bytes, retries=retries,
                      host_connections=host_connections, counter=counter)
    return load_bytes(data, n_px, max_bytes=max_bytes, max_pixels=max_pixels, draft=draft)


def load_bytes(data: bytes | None, n_px: int, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: bool = False, where: str = "embedded image") -> Loaded:
    """Encoded bytes already in hand (a manifest's bytes column, a tar member) -> Loaded; max_bytes applies too."""
    if data is None:  # a null in the manifest's bytes column
        raise ImageError("read", f"no image: the bytes column is null in this row: {where}")
    if len(data) > max_bytes:
        raise ImageError("read", f"too large: {len(data)} bytes > max_bytes {max_bytes}: {where}")
    img = decode(data, max_pixels=max_pixels, draft_size=n_px if draft else None)
    width, height = img.info.get("source_size", img.size)
    return Loaded(resize(img, n_px), width, height, hashlib.sha256(data).hexdigest())


def load_rgb(uri: str, n_px: int, storage_options: dict | None = None, **kw) -> tuple[np.ndarray, int, int]:
    """load() without the hash: (uint8 (n_px, n_px, 3), source width, source height after EXIF)."""
    got = load(uri, n_px, storage_options, **kw)
    return got.rgb, got.width, got.height
