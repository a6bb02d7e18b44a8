"""Tests for igpt_batch.inputs.images on real files, a real HTTP server and the real HF processor."""

import io
import pickle
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from conftest import encode_image, read_err, write_file
from PIL import Image
from skimage import data

from igpt_batch import errors, redact
from igpt_batch.errors import ImageError
from igpt_batch.inputs import fetch, images
from igpt_batch.model import palette


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h RGB pixels but carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")


def _decode_err(payload: bytes, **kw) -> ImageError:
    with pytest.raises(ImageError) as e:
        images.decode(payload, **kw)
    assert e.value.stage == "decode"
    return e.value


def _hf_ids(clusters, arrays, n_px):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision fallback notice
        from transformers import ImageGPTImageProcessor

        proc = ImageGPTImageProcessor(clusters=clusters, size={"height": n_px, "width": n_px})
    return proc(images=arrays, return_tensors="np")["input_ids"]


# ----------------------------------------------------------------------------- decoding modes


def test_png_and_jpeg(tmp_path):
    photo = data.astronaut()[::4, ::4]  # (128, 128, 3)
    png = write_file(tmp_path / "a.png", encode_image(Image.fromarray(photo), "PNG"))
    jpg = write_file(tmp_path / "a.jpg", encode_image(Image.fromarray(photo), "JPEG", quality=95))
    img = images.decode(fetch.read_bytes(png))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), photo)
    rgb, w, h = images.load_rgb(jpg, 32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 and (w, h) == (128, 128)
    assert np.abs(rgb.astype(int) - images.resize(Image.fromarray(photo), 32).astype(int)).mean() < 3
    assert images.load_rgb("file://" + png, 8)[0].shape == (8, 8, 3)


def test_grayscale_rgba_la_and_palette_transparency():
    gray = encode_image(Image.new("L", (6, 5), 77), "PNG")
    assert np.all(np.asarray(images.decode(gray)) == 77)
    la = encode_image(Image.new("LA", (6, 5), (90, 0)), "PNG")
    assert np.all(np.asarray(images.decode(la)) == 90)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (10, 20, 30, 0)  # fully transparent: alpha dropped, stored colour kept
    rgba[2:] = (200, 100, 50, 255)
    payload = encode_image(Image.fromarray(rgba, "RGBA"), "PNG")
    got = np.asarray(images.decode(payload))
    assert np.array_equal(got, rgba[..., :3])
    with Image.open(io.BytesIO(payload)) as ref:
        assert np.array_equal(got, np.asarray(ref.convert("RGB")))  # same as a plain convert("RGB")

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    payload = encode_image(pal, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "palette images with transparency" warning either
        got = np.asarray(images.decode(payload))
    assert got.tolist() == [[[10, 20, 30], [200, 100, 50]], [[200, 100, 50], [10, 20, 30]]]


def test_cmyk_jpeg():
    payload = encode_image(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(payload)) as raw:
        assert raw.mode == "CMYK"
    img = images.decode(payload)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - [255, 0, 0]).max() <= 8


def test_16_bit_png_is_scaled_not_clipped():
    a = np.array([[0, 257, 32896, 65535]], np.uint16)
    payload = encode_image(Image.fromarray(a), "PNG")
    with Image.open(io.BytesIO(payload)) as raw:
        assert raw.mode.startswith("I")  # really 16-bit on disk
    got = np.asarray(images.decode(payload))
    assert got.shape == (1, 4, 3)
    assert got[0, :, 0].tolist() == [0, 1, 128, 255] and (got == got[..., :1]).all()
    full = encode_image(Image.fromarray(np.full((3, 3), 65535, np.uint16)), "PNG")
    assert (np.asarray(images.decode(full)) == 255).all()


def test_one_pixel_image(tmp_path):
    uri = write_file(tmp_path / "one.png", encode_image(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"))
    assert images.decode(fetch.read_bytes(uri)).size == (1, 1)
    rgb, w, h = images.load_rgb(uri, 4)
    assert (w, h) == (1, 1) and (rgb == [12, 34, 56]).all()


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    payload = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(payload)) as raw:
        assert raw.n_frames == 3
    assert (np.asarray(images.decode(payload)) == [255, 0, 0]).all()


def test_exif_rotated_jpeg(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    uri = write_file(tmp_path / "rot.jpg", encode_image(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes()))
    img = images.decode(fetch.read_bytes(uri))
    assert img.size == (20, 40)  # width/height swapped
    got = np.asarray(img).astype(int)
    assert np.abs(got[:15] - [255, 0, 0]).max() < 40  # old left (red) is now the top
    assert np.abs(got[25:] - [0, 0, 255]).max() < 40
    _, w, h = images.load_rgb(uri, 8)
    assert (w, h) == (20, 40)


# ----------------------------------------------------------------------------- decode errors


def test_truncated_empty_and_non_image(tmp_path):
    jpg = encode_image(Image.fromarray(data.coffee()), "JPEG", quality=90)
    assert "truncated" in str(_decode_err(jpg[: len(jpg) // 2]))
    empty = write_file(tmp_path / "empty.jpg", b"")
    with pytest.raises(ImageError) as e:
        images.load_rgb(empty, 8)
    assert e.value.stage == "decode" and "empty" in str(e.value)
    text = write_file(tmp_path / "notes.jpg", b"this is not a jpeg\n" * 10)
    with pytest.raises(ImageError) as e:
        images.load_rgb(text, 8)
    assert e.value.stage == "decode" and "not a recognised image" in e.value.reason


def test_decompression_bomb_rejected_before_decoding():
    # Header-only PNGs: decoding would fail differently ("truncated"), so "too large" proves
    # the size check ran first.
    assert "corrupt or truncated" in _decode_err(_png_header_only(100, 100)).reason
    assert "too large" in _decode_err(_png_header_only(100, 100), max_pixels=9_999).reason
    assert "too large" in _decode_err(_png_header_only(9_000, 9_000)).reason  # 81M > our 64M default
    assert "too large" in _decode_err(_png_header_only(100_000, 100_000)).reason  # PIL's own bomb error
    # A real, valid 80-megapixel 1-bit PNG (tiny on disk): rejected from its header, fast.
    payload = encode_image(Image.new("1", (20_000, 4_000)), "PNG")
    assert len(payload) < 1_000_000
    t0 = time.perf_counter()
    err = _decode_err(payload)
    assert "20000x4000" in err.reason and time.perf_counter() - t0 < 1.0


def test_tiny_png_with_low_limit():
    payload = encode_image(Image.new("RGB", (10, 10)), "PNG")
    assert images.decode(payload, max_pixels=100).size == (10, 10)
    assert "too large" in _decode_err(payload, max_pixels=99).reason


def test_image_error_pickles():
    e = pickle.loads(pickle.dumps(ImageError("read", "file not found: x")))
    assert isinstance(e, ImageError) and (e.stage, e.reason, str(e)) == ("read", "file not found: x", "file not found: x")


# ----------------------------------------------------------------------------- end to end vs HF


def test_load_rgb_tokens_equal_processor(tmp_path):
    clusters = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    sources = [data.astronaut(), data.coffee(), data.chelsea()[:300, :451], data.rocket()[100:150, 200:237]]
    uris, decoded = [], []
    for i, src in enumerate(sources):
        uri = write_file(tmp_path / f"p{i}.jpg", encode_image(Image.fromarray(src), "JPEG", quality=90))
        uris.append(uri)
        decoded.append(np.asarray(images.decode(fetch.read_bytes(uri))))
    assert len({d.shape for d in decoded}) == 4  # all different sizes, incl. a 50x37 one
    for n_px in (32, 24):
        ours = np.stack([palette.tokenize(images.load_rgb(u, n_px)[0], clusters) for u in uris])
        assert np.array_equal(ours, _hf_ids(clusters, decoded, n_px))


def test_draft_is_close_to_full_decode(tmp_path):
    # Large JPEG (2048x1536, stored rotated by EXIF): draft decodes at 1/8 scale.
    big = Image.fromarray(data.astronaut()).resize((2048, 1536), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    uri = write_file(tmp_path / "big.jpg", encode_image(big, "JPEG", quality=90, exif=exif.tobytes()))
    payload = fetch.read_bytes(uri)
    drafted = images.decode(payload, draft_size=32)
    assert max(drafted.size) <= 512 and drafted.info["source_size"] == (1536, 2048)
    full, w, h = images.load_rgb(uri, 32)
    fast, wd, hd = images.load_rgb(uri, 32, draft=True)
    assert (w, h) == (wd, hd) == (1536, 2048)
    clusters = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    same = (palette.tokenize(full, clusters) == palette.tokenize(fast, clusters)).mean()
    assert same >= 0.9, same
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 2


# ----------------------------------------------------------------------------- safe uris, error classes and stages


@pytest.mark.parametrize("uri, safe", [
    ("https://user:pa55word@host.example:8443/a/b.png?x=1", "https://host.example:8443/a/b.png?x=1"),
    ("https://bkt.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024&"
     "X-Amz-Signature=abc123&X-Amz-Security-Token=tok", "https://bkt.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-"
     "SHA256&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/p.jpg?sv=2022&se=2030&sp=r&sig=SAS%3D", "https://acct.blob.core.windows.net/"
     "c/p.jpg?sv=2022&se=2030&sp=r&sig=***"),
    ("https://storage.googleapis.com/b/o.png?GoogleAccessId=svc@x&Expires=1&Signature=s1g", "https://storage.googleapis"
     ".com/b/o.png?GoogleAccessId=***&Expires=1&Signature=***"),
    ("http://h/x.png?token=t0k&versionId=3#access_token=frag", "http://h/x.png?token=***&versionId=3#access_token=***"),
    ("simplecache::s3://key:secret@bkt/a.png", "simplecache::s3://bkt/a.png"),
    ("s3://bkt/dir/a.png", "s3://bkt/dir/a.png"),
    ("/data/my photo::1.png", "/data/my photo::1.png"),
    ("/data/caf\udce9.png", "/data/caf\\udce9.png"),
])
def test_redact_uri(uri, safe):
    assert redact.redact_uri(uri) == safe


def test_reason_classes_of_the_reasons_this_module_gives(tmp_path, http_root):
    root, base = http_root
    write_file(root / "pic.png", encode_image(Image.new("RGB", (7, 3)), "PNG"))
    jpg = encode_image(Image.fromarray(data.coffee()), "JPEG", quality=90)
    got = {
        "missing": read_err(str(tmp_path / "secret-folder" / "gone.png")).reason,
        "dir": read_err(str(tmp_path)).reason,
        "big": read_err(f"{base}/pic.png", timeout=5, max_bytes=10).reason,
        "404": read_err(f"{base}/nope.png?sig=abc", timeout=5).reason,
        "protocol": read_err("nosuchproto://bkt/x.png").reason,
        "truncated": _decode_err(jpg[: len(jpg) // 2]).reason,
        "bomb": _decode_err(_png_header_only(100, 100), max_pixels=9_999).reason,
        "pil bomb": _decode_err(_png_header_only(100_000, 100_000), max_pixels=50_000_000).reason,
        "empty": _decode_err(b"").reason,
        "not image": _decode_err(b"hello" * 10).reason,
    }
    classes = {k: errors.reason_class(v) for k, v in got.items()}
    assert classes == {
        "missing": "file not found", "dir": "is a directory", "big": "too large (over max_bytes 10)", "404": "HTTP 404",
        "protocol": "unknown protocol (nosuchproto)", "truncated": "corrupt or truncated image",
        "bomb": "decompression bomb (over --max-pixels 9999)", "pil bomb": "decompression bomb (over --max-pixels 50000000)",
        "empty": "empty data", "not image": "not a recognised image format",
    }
    assert errors.reason_class("timed out after 1.5s: http://h/x.png") == "timed out after 1.5s"
    assert errors.reason_class("ValueError: bad things at /secret/x.png") == "ValueError"
    assert errors.reason_class(got["truncated"].replace("truncated", "x")) != ""  # never empty


def test_bomb_reason_names_the_flag_and_its_value():
    err = _decode_err(_png_header_only(9_000, 9_000), max_pixels=64_000_000)
    assert "--max-pixels 64000000" in err.reason and "9000x9000 = 81000000 pixels" in err.reason


