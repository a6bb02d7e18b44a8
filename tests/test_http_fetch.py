"""igpt_batch.inputs.http_fetch, through fetch.read_bytes: a real HTTP server answering, failing, redirecting and
limited per host."""
import threading
import time

import pytest
from conftest import encode_image, read_err, write_file
from PIL import Image

from igpt_batch import errors
from igpt_batch.inputs import fetch, images


def test_http_ok_404_and_size(http_root):
    root, base = http_root
    png = encode_image(Image.new("RGB", (7, 3), (40, 50, 60)), "PNG")
    write_file(root / "pic.png", png)
    assert fetch.read_bytes(f"{base}/pic.png", timeout=5) == png
    rgb, w, h = images.load_rgb(f"{base}/pic.png", 4, timeout=5)
    assert (w, h) == (7, 3) and (rgb == [40, 50, 60]).all()
    err = read_err(f"{base}/nope.png?X-Amz-Signature=s3cr3t", timeout=5)
    assert "HTTP 404" in err.reason and "s3cr3t" not in err.reason
    assert "too large" in read_err(f"{base}/pic.png", timeout=5, max_bytes=10).reason
    err = read_err(f"{base}/nope.png", timeout=5, storage_options={"headers": {"Authorization": "Bearer topsecret"}})
    assert "topsecret" not in str(err)


def test_always_429_gives_up_after_the_retries_honouring_a_capped_retry_after(http_server):
    state, base = http_server
    state["mode"] = "429"
    counter, t0 = [], time.perf_counter()
    with pytest.raises(errors.ImageError) as e:
        fetch.read_bytes(f"{base}/coffee.jpg", timeout=2, retries=2, counter=counter)
    elapsed = time.perf_counter() - t0
    assert e.value.stage == "read" and errors.reason_class(e.value.reason) == "HTTP 429" and counter == [2]
    assert 4 <= elapsed < 10  # Retry-After: 3600 honoured, capped at the read timeout (2 s) per retry


def test_redirects_to_file_are_refused_and_hosts_are_limited(http_server):
    state, base = http_server
    state["mode"] = "redirect"
    with pytest.raises(errors.ImageError, match="redirect refused"):
        fetch.read_bytes(f"{base}/coffee.jpg", timeout=5)
    state["mode"], state["expect"] = "slow", state["arrived"] + 6  # each request waits for a second to come in
    threads = [threading.Thread(target=fetch.read_bytes, args=(f"{base}/{n}.jpg",),
                                kwargs={"timeout": 5, "host_connections": 2}) for n in ("coffee", "rocket") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["max_active"] == 2
