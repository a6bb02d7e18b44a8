"""igpt_batch.inputs.tars: brace specs, WebDataset keys, one tar's index and its members, on real tar files."""
import hashlib
import io
import tarfile

import fsspec
import pytest
from conftest import make_tar

from igpt_batch.errors import ImageError, ManifestError
from igpt_batch.inputs import tars


def test_brace_ranges_keep_padding_and_lists_expand_in_order():
    assert tars.expand_braces("s3://b/{00000..00002}.tar") == ["s3://b/00000.tar", "s3://b/00001.tar", "s3://b/00002.tar"]
    assert tars.expand_braces("d/{3..1}-{a,b}.tar") == ["d/3-a.tar", "d/3-b.tar", "d/2-a.tar", "d/2-b.tar",
                                                        "d/1-a.tar", "d/1-b.tar"]
    assert tars.expand_braces("d/{x}.tar") == ["d/{x}.tar"] and not tars.has_braces("d/{x}.tar")
    assert tars.has_braces("d/{0..9}.tar") and tars.has_braces("d/{a,b}.tar")


def test_keys_are_the_name_before_the_first_dot():
    assert tars.split_key("s/000.seg.JPG") == ("s/000", "seg.jpg")  # webdataset's base_plus_ext
    assert tars.split_key("dir.v2/abc.png") == ("dir.v2/abc", "png")
    assert tars.split_key("README") is None


def tar_with(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_index_lists_each_samples_first_image_with_its_digest(tmp_path):
    (tmp_path / "a.tar").write_bytes(tar_with([("k1.jpg", b"one"), ("k1.png", b"second image of k1"),
                                               ("k1.json", b"{}"), ("k2.webp", b"two"), ("k3.txt", b"no image")]))
    fs = fsspec.filesystem("file")
    t = tars.index_table(fs, str(tmp_path / "a.tar"))
    assert t.column("id").to_pylist() == ["k1", "k2"] and t.column("member").to_pylist() == ["k1.jpg", "k2.webp"]
    assert t.column("uri").to_pylist() == [f"{tmp_path}/a.tar#k1.jpg", f"{tmp_path}/a.tar#k2.webp"]
    assert t.column("sha256").to_pylist() == [hashlib.sha256(b).hexdigest() for b in (b"one", b"two")]
    assert "sha256" not in tars.index_table(fs, str(tmp_path / "a.tar"), digest=False).column_names
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ManifestError, match="cannot read tar"):
        tars.index_table(fs, str(tmp_path / "bad.tar"))


def test_members_in_one_pass_with_a_read_error_for_each_missing_or_too_large(tmp_path):
    tar = make_tar({"a": b"A" * 10, "b": b"B" * 100, "c": b"C" * 10})
    (tmp_path / "s.tar").write_bytes(tar)
    url = str(tmp_path / "s.tar")
    got = list(tars.members(url, ["a.jpg", "gone.jpg", "b.jpg", "c.jpg"], None, max_bytes=50))
    assert got[0] == b"A" * 10 and got[3] == b"C" * 10
    assert isinstance(got[1], ImageError) and got[1].reason == f"file not found: {url}#gone.jpg"
    assert isinstance(got[2], ImageError) and got[2].reason.startswith("too large: 100 bytes > max_bytes 50")
    (tmp_path / "cut.tar").write_bytes(tar[:700])  # the tar ends after a.jpg's bytes, in its block's padding
    first, rest = tars.members(str(tmp_path / "cut.tar"), ["a.jpg", "c.jpg"], None, max_bytes=50)
    assert first == b"A" * 10  # what was whole comes through; what follows is a read error
    assert isinstance(rest, ImageError) and rest.stage == "read" and rest.reason.startswith("cannot read (ReadError)")
