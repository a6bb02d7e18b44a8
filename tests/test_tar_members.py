"""WebDataset tars with members that are not regular files, names that are not UTF-8, no end-of-archive marker."""
import io
import os
import tarfile

import numpy as np
import pytest

from igpt_batch import config
from igpt_batch.errors import ManifestError
from igpt_batch.inputs.manifest import scan_manifest
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output


@pytest.fixture(scope="module")
def photos(image_dir):
    return {p.stem: p.read_bytes() for p in sorted(image_dir.iterdir()) if p.suffix == ".jpg" and p.stem not in ("text", "truncated")}


def tar_of(entries: list[tuple[str, object]]) -> bytes:
    """entries: (name, bytes) regular files, (name, ("sym"|"hard", target)) links, (name, "dir") folders."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, what in entries:
            info = tarfile.TarInfo(name)
            if isinstance(what, bytes):
                info.size = len(what)
                tf.addfile(info, io.BytesIO(what))
                continue
            if what == "dir":
                info.type = tarfile.DIRTYPE
            else:
                info.type, info.linkname = (tarfile.SYMTYPE if what[0] == "sym" else tarfile.LNKTYPE), what[1]
            tf.addfile(info)
    return buf.getvalue()


def extract(tiny_ckpt, spec, out, shard_size=64):
    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": str(out), "run.executor": "local",
                             "run.shard_size": shard_size, "extract.batch_size": 4, "extract.layers": [1],
                             "output.contact_sheet": 0, "input.manifest": spec})
    s = run_job(cfg, "extract")
    emb = read_output(str(out), "embeddings").sort_by("id")
    err = read_output(str(out), "errors")
    return s, emb, dict(zip(err.column("id").to_pylist(), err.column("error").to_pylist()))


@pytest.mark.parametrize("shard_size", [64, 2])
def test_links_and_folders_are_error_rows_and_later_members_still_read(tiny_ckpt, photos, tmp_path, shard_size):
    a, b, c, d = list(photos)
    entries = [("k1.png", ("sym", "k0.png")), ("k1.png", photos[a]),  # a symlink before a regular file of that name
               (f"{a}.jpg", photos[a]), ("k2.jpg", ("hard", f"{a}.jpg")), ("k3.jpg", "dir"),
               (f"{b}.jpg", photos[b]), ("k4.webp", ("sym", "/etc/passwd")), (f"{c}.jpg", photos[c]),
               (f"{d}.jpg", photos[d])]
    (tmp_path / "00000.tar").write_bytes(tar_of(entries))
    s, emb, err = extract(tiny_ckpt, str(tmp_path / "00000.tar"), tmp_path / "out", shard_size)
    assert s["rows"] == {"embeddings": 4, "errors": 4}
    assert emb.column("id").to_pylist() == sorted([a, b, c, d])
    assert set(err) == {"k1", "k2", "k3", "k4"}
    assert "symbolic link" in err["k1"] and "hard link" in err["k2"] and "directory" in err["k3"]
    assert "symbolic link" in err["k4"] and all("not a regular file" in e and "00000.tar#k" in e for e in err.values())
    (tmp_path / "plain.tar").write_bytes(tar_of([(f"{k}.jpg", photos[k]) for k in (a, b, c, d)]))
    _, ref, _ = extract(tiny_ckpt, str(tmp_path / "plain.tar"), tmp_path / "ref")
    np.testing.assert_allclose(np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(ref.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-6)


def test_a_tar_without_its_end_marker_is_flagged_possibly_truncated(tiny_ckpt, photos, tmp_path):
    a, b = list(photos)[:2]
    data = tar_of([(f"{a}.jpg", photos[a]), (f"{b}.jpg", photos[b])])
    end = 512 + -(-len(photos[a]) // 512) * 512 + 512 + -(-len(photos[b]) // 512) * 512  # the last member's end
    assert data[end:].strip(b"\0") == b""
    (tmp_path / "cut.tar").write_bytes(data[:end])
    (tmp_path / "whole.tar").write_bytes(data)
    assert scan_manifest(str(tmp_path / "whole.tar")).rows == 2
    s, emb, err = extract(tiny_ckpt, str(tmp_path / "cut.tar"), tmp_path / "out")
    assert emb.column("id").to_pylist() == sorted([a, b])  # what is there is read
    assert s["rows"] == {"embeddings": 2, "errors": 1}
    (why,) = err.values()
    assert "possibly truncated" in why and "cut.tar" in why


def test_non_utf8_names_give_a_message_naming_the_tar(photos, tmp_path):
    a = next(iter(photos))
    bad_member = tar_of([(f"{a}.jpg", photos[a]), (os.fsdecode(b"caf\xe9.jpg"), photos[a])])
    (tmp_path / "members.tar").write_bytes(bad_member)
    with pytest.raises(ManifestError, match=r"members\.tar.*not valid UTF-8"):
        scan_manifest(str(tmp_path / "members.tar"))
    folder = tmp_path / "named"
    folder.mkdir()
    (folder / os.fsdecode(b"sh\xe9rd.tar")).write_bytes(tar_of([(f"{a}.jpg", photos[a])]))
    with pytest.raises(ManifestError, match=r"sh\\xe9rd\.tar.*not valid UTF-8"):
        scan_manifest(str(folder))
