"""WebDataset tar shards: brace-expanded URLs, samples by key, read streaming (tarfile over fsspec, never unpacked)."""
from __future__ import annotations

import hashlib
import re
import tarfile
from typing import Iterator

import fsspec
import pyarrow as pa

from igpt_batch.errors import ImageError, ManifestError
from igpt_batch.inputs.fetch import _fsspec_error
from igpt_batch.redact import redact_uri

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's first member with one of these extensions is its image
TAR_EXTS = (".tar",)
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: __key__ is the name before the first dot


def has_braces(spec: str) -> bool:
    m = _BRACE.search(spec)
    return bool(m) and (".." in m.group(1) or "," in m.group(1))


def expand_braces(spec: str) -> list[str]:
    """'s3://b/{00000..00002}.tar' -> ['s3://b/00000.tar', 's3://b/00001.tar', 's3://b/00002.tar'] (bash and
    webdataset's braceexpand: numeric ranges keep the first bound's zero padding; {a,b} lists), in order."""
    m = next((m for m in _BRACE.finditer(spec) if ".." in m.group(1) or "," in m.group(1)), None)
    if m is None:
        return [spec]
    body, head, tail = m.group(1), spec[:m.start()], spec[m.end():]
    lo, sep, hi = body.partition("..")
    if sep and lo.isdigit() and hi.isdigit():
        step = 1 if int(hi) >= int(lo) else -1
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def split_key(name: str) -> tuple[str, str] | None:
    """A member name -> (sample key, extension), as webdataset reads it; None for names without an extension."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _images(tf: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(key, member) of each sample's image, in tar order; later images of the same sample are skipped."""
    last = None
    for member in tf:
        parts = split_key(member.name) if member.isfile() else None
        if parts and parts[1] in IMAGE_EXTS and parts[0] != last:
            last = parts[0]
            yield parts[0], member


def index_table(fs: fsspec.AbstractFileSystem, path: str, digest: bool = True) -> pa.Table:
    """One tar's samples as manifest rows: id (the key), uri (tar#member), member (its name in the tar), and the
    sha256 of the image (the content identity the scan fingerprints; with digest=False, none, and a local tar's
    images are skipped over, not read), streaming the tar once."""
    url = path if "file" in fs.protocol else fs.unstrip_protocol(path)
    ids, uris, names, shas = [], [], [], []
    try:
        mode = "r|*" if digest or "file" not in fs.protocol else "r:*"
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tf:
            for key, member in _images(tf):
                ids.append(key), uris.append(f"{url}#{member.name}"), names.append(member.name)
                if digest:
                    shas.append(hashlib.sha256(tf.extractfile(member).read()).hexdigest())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ManifestError(f"cannot read tar {redact_uri(url)}: {type(e).__name__}: {e}") from None
    return pa.table({"id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()),
                     "member": pa.array(names, pa.string()), **({"sha256": pa.array(shas, pa.string())} if digest else {})})


def members(url: str, names: list[str], storage_options: dict | None, max_bytes: int) -> Iterator[bytes | ImageError]:
    """The bytes of each named member (in tar order), or a read error for one missing, too large, or after the tar
    failed; one streaming pass over the tar."""
    where, i = redact_uri(url), 0
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            at = {n: j for j, n in enumerate(names)}
            for member in tf:
                j = at.get(member.name, -1)
                if j < i:
                    continue
                while i < j:  # members the plan names but the tar no longer holds before this one
                    yield ImageError("read", f"file not found: {where}#{names[i]}")
                    i += 1
                if member.size > max_bytes:
                    yield ImageError("read", f"too large: {member.size} bytes > max_bytes {max_bytes}: {where}#{member.name}")
                else:
                    yield tf.extractfile(member).read()
                i += 1
                if i == len(names):
                    return
    except (tarfile.TarError, EOFError) as e:
        error = ImageError("read", f"cannot read ({type(e).__name__}): {where}")
    except Exception as e:
        error = _fsspec_error(e, url, where)
    else:
        error = None
    for name in names[i:]:
        yield error or ImageError("read", f"file not found: {where}#{name}")
