"""Checks before any work that keep a job off what is not its own: an unusable output, or one that overlaps the inputs."""
from __future__ import annotations

import errno
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch import uris
from igpt_batch.errors import ConfigError


def _norm(url: str) -> tuple[str, str]:
    """(protocol, path without a trailing '/'); local paths made absolute, file:// URLs decoded."""
    path = uris.local_path(url)
    if path is not None:
        return "file", os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"
    scheme, rest = url.split("://", 1)
    return scheme.lower(), rest.split("?", 1)[0].rstrip("/")


def _overlaps(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """a is b, lies under b, or contains b."""
    if a[0] != b[0]:
        return False
    x, y = a[1], b[1]
    return x == y or x.startswith(y.rstrip("/") + "/") or y.startswith(x.rstrip("/") + "/")


def check_output_usable(url: str, write_probe: bool = True) -> None:
    """A local output must be a folder (or creatable) that this process can write; refused with a message if not.
    Without write_probe (a dry run) an existing folder's permissions are checked instead of writing into it."""
    protocol, path = _norm(url)
    if protocol != "file":
        return  # object stores answer for themselves (access denied is a clear JobError at the first read)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output {url} is a file, not a folder")
    if not os.path.exists(path):  # created later, by the job: its nearest existing folder must allow that
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"output {url} cannot be created: {parent} is not a writable folder")
        return
    if not write_probe:
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output {url} is not writable (permission denied)")
        return
    probe = os.path.join(path, f".igpt-write-probe.{uuid.uuid4().hex}")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__).lower()
        raise ConfigError(f"output {url} is not writable ({why})") from None


def check_not_inputs(output: str, manifest: str, batches) -> None:
    """Refuse an output that is, lies under or contains the manifest, its folder of images, or any input image's
    folder: --overwrite and retries must never touch a user's inputs. `batches` streams the manifest's
    (id, uri) tables; each batch is checked column-wise in Arrow."""
    out = _norm(output)
    spec = manifest.split("*", 1)[0].split("{", 1)[0]  # a glob's or brace range's fixed part
    if _overlaps(out, _norm(spec)):
        raise ConfigError(f"output {output} overlaps the manifest {manifest}: write the output somewhere else")
    for t in batches:
        uris = t.column("uri").combine_chunks() if isinstance(t, pa.Table) else t
        folders = pc.unique(pc.replace_substring_regex(uris, r"/[^/]*$", ""))
        for folder in folders.to_pylist():
            if folder and _overlaps(out, _norm(folder)):
                raise ConfigError(f"output {output} overlaps the input images in {folder}: write the output "
                                  "somewhere else")


def plan_write_error(e: OSError, output: str) -> str:
    """The message for a failure while writing the plan files."""
    if e.errno == errno.ENOSPC:
        return f"no space left on the disk of {output} while writing the plan (_plan/): free some space and rerun"
    return f"could not write the plan to {output}: {e.strerror or type(e).__name__}"
