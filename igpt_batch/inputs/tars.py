"""WebDataset tar shards: brace-expanded URLs, samples by key, read streaming (tarfile over fsspec, never unpacked)."""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from typing import Iterator

import fsspec
import pyarrow as pa

from igpt_batch.errors import ImageError, ManifestError
from igpt_batch.inputs.fetch import _fsspec_error
from igpt_batch.redact import redact_uri

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's first member with one of these is its image
TAR_EXTS = (".tar",)
TRUNCATED = ""  # the member name of the row flagging a tar without its end-of-archive marker (no member has it)
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
    """(key, member) of each sample's image, in tar order; later images of the same sample are skipped. A link or
    folder named like an image is listed too: its row is an error saying so (not_regular)."""
    last = None
    for member in tf:
        parts = split_key(member.name)
        if parts and parts[1] in TAR_IMAGE_EXTS and parts[0] != last:
            last = parts[0]
            yield parts[0], member


def not_regular(member: tarfile.TarInfo) -> str | None:
    """What a member is when it is not a regular file (its bytes are not an image to read), else None."""
    if member.isfile():
        return None
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    return "a directory" if member.isdir() else f"tar member type {member.type!r}"


def ended(tf: tarfile.TarFile) -> bool:
    """After reading every member: whether the tar ended with its end-of-archive marker (a zero block), rather
    than simply stopping at a member's end, as a cut upload or copy does. tarfile reads that block past the
    last member's end, and nothing when there is none."""
    return tf.fileobj.tell() > tf.offset


def _utf8(name: str, what: str, url: str) -> str:
    """name itself when it is valid UTF-8 (ids and uris are strings), else a message naming the tar."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:  # undecodable bytes (surrogate escapes): shown as the bytes they were
        shown = lambda s: os.fsencode(s).decode("utf-8", "backslashreplace")  # noqa: E731
        raise ManifestError(f"cannot read tar {redact_uri(shown(url))}: "
                            f"{what + ' ' + repr(shown(name)) if what else 'its name'} is not valid UTF-8; rename it") from None


def index_table(fs: fsspec.AbstractFileSystem, path: str, digest: bool = True) -> pa.Table:
    """One tar's samples as manifest rows: id (the key), uri (tar#member), member (its name in the tar), and the
    sha256 of the image (the content identity the scan fingerprints; with digest=False, none, and a local tar's
    images are skipped over, not read), streaming the tar once."""
    url = _utf8(path if "file" in fs.protocol else fs.unstrip_protocol(path), "", path)
    ids, uris, names, shas = [], [], [], []
    try:
        mode = "r|*" if digest or "file" not in fs.protocol else "r:*"
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tf:
            for key, member in _images(tf):
                name = _utf8(member.name, "member", url)
                ids.append(key), uris.append(f"{url}#{name}"), names.append(name)
                if digest:  # a link's or folder's identity is what it is, not bytes it has none of
                    kind = not_regular(member)
                    shas.append(hashlib.sha256(kind.encode() if kind else tf.extractfile(member).read()).hexdigest())
            if not ended(tf):  # one more row: the error that flags the tar as possibly truncated
                ids.append(f"{redact_uri(url)}#"), uris.append(f"{url}#"), names.append(TRUNCATED)
                shas.append(hashlib.sha256(b"").hexdigest())
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
                if not_regular(member):  # a link or folder named like an image: never followed
                    yield ImageError("read", f"not a regular file ({not_regular(member)}): {where}#{member.name}")
                elif member.size > max_bytes:
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
        if name == TRUNCATED and error is None:
            yield ImageError("read", "possibly truncated: the tar has no end-of-archive marker, so samples after the "
                                     f"last one read may be missing: {where}")
        else:
            yield error or ImageError("read", f"file not found: {where}#{name}")
