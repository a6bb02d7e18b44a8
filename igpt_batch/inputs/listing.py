"""List what a manifest spec names, once: manifest files, image files or WebDataset tars, and their base folder."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec

from igpt_batch.errors import JobError, ManifestError
from igpt_batch.inputs import tars
from igpt_batch.inputs.manifest_files import name_of
from igpt_batch.redact import redact_text, redact_uri, scrub_secrets

MANIFEST_EXTS = (".parquet", ".csv", ".jsonl", ".ndjson")
IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
OUTPUT_MARKER = "_job.json"  # a folder holding it is an igpt-batch output: never read as input


@dataclass(frozen=True)
class Listing:
    """What a manifest spec names: manifest files or image files, and the folder image ids are relative to."""

    fs: fsspec.AbstractFileSystem
    holds: str  # "manifests" | "images" | "tars"
    files: list[str]
    base: str


def list_inputs(spec: str, storage_options: dict) -> Listing:
    """List what `spec` names, once; a clear ManifestError for anything that cannot be listed."""
    try:
        return _list(spec, storage_options)
    except ManifestError:
        raise
    except PermissionError:  # never echo storage options: they hold the keys
        raise ManifestError(f"access denied to manifest {redact_uri(spec)}: check the storage credentials") from None
    except (TypeError, ValueError, AttributeError, ImportError, OSError) as e:  # options the filesystem rejects...
        why = scrub_secrets(f"{type(e).__name__}: {e}", storage_options)
        raise ManifestError(f"cannot open manifest {redact_uri(spec)} ({why}): check the URL and the storage options "
                            "(their names and types)") from None
    except Exception as e:  # a dropped connection while listing (aiohttp's errors are not OSErrors): not the input
        why = redact_text(scrub_secrets(f"{type(e).__name__}: {e}", storage_options))
        raise JobError(f"cannot read manifest {redact_uri(spec)} ({why})") from None


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _list(spec: str, storage_options: dict) -> Listing:
    if tars.has_braces(spec):  # WebDataset's shards/{00000..00099}.tar: each one must exist
        urls = tars.expand_braces(spec)
        fs, first = fsspec.core.url_to_fs(urls[0], **storage_options)
        paths = [first] + [fsspec.core.url_to_fs(u, **storage_options)[1] for u in urls[1:]]
        missing = [u for u, p in zip(urls, paths) if not fs.exists(p)]
        if missing:
            raise ManifestError(f"{len(missing)} of {len(urls)} tars not found (e.g. {redact_uri(missing[0])})")
        return _classify(fs, spec, posixpath.dirname(first), paths, paths)
    fs, path = fsspec.core.url_to_fs(spec, **storage_options)
    if any(c in (path if "://" not in path else path.partition("?")[0]) for c in "*?["):  # a URL's ?query: no glob
        base = path[:min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0]
        outputs: dict[str, bool] = {}
        found = [f for f in sorted(fs.glob(path)) if not _excluded(fs, f, base, outputs)]
        return _classify(fs, spec, base, found, found)
    if fs.isdir(path):
        top, found = _walk(fs, path.rstrip("/"), spec)
        return _classify(fs, spec, path.rstrip("/"), top, found)
    if fs.exists(path):
        return _classify(fs, spec, posixpath.dirname(path), [path], [path])
    raise ManifestError(f"manifest not found: {redact_uri(spec)}")


def _excluded(fs: fsspec.AbstractFileSystem, path: str, base: str, outputs: dict[str, bool]) -> bool:
    """A glob match inside a _ or . folder, or inside an igpt-batch output folder (one holding _job.json)."""
    rel = path[len(base) + 1:] if base and path.startswith(base + "/") else path
    if any(_hidden(p) for p in rel.split("/")):
        return True
    folder = posixpath.dirname(path)
    while folder and folder.startswith(base):
        if folder not in outputs:
            outputs[folder] = fs.exists(posixpath.join(folder, OUTPUT_MARKER))
        if outputs[folder]:
            return True
        if folder == base or posixpath.dirname(folder) == folder:
            break
        folder = posixpath.dirname(folder)
    return False


def _walk(fs: fsspec.AbstractFileSystem, root: str, spec: str) -> tuple[list[str], list[str]]:
    """(files at the top level, all files) under root, never entering _ or . folders or igpt-batch outputs."""
    top: list[str] | None = None
    found: list[str] = []
    for folder, dirs, files in fs.walk(root, topdown=True, detail=False):
        if OUTPUT_MARKER in files:
            if top is None:
                raise ManifestError(f"{redact_uri(spec)} is an igpt-batch output (it holds {OUTPUT_MARKER}), not input: "
                                    "pass the manifest or the images it was made from")
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not _hidden(d)]  # pruned in place: fsspec's walk then skips them
        paths = [posixpath.join(folder, f) for f in files if not _hidden(f)]
        top = paths if top is None else top
        found += paths
    return top or [], sorted(found)


def _classify(fs, spec: str, base: str, top: list[str], found: list[str]) -> Listing:
    """Manifest files when the top level holds them and no images; else images (at any depth); else tars."""
    is_manifest = lambda f: name_of(f).endswith(MANIFEST_EXTS)  # noqa: E731
    is_image = lambda f: name_of(f).endswith(IMAGE_FILE_EXTS)  # noqa: E731
    top_manifests, top_images = [f for f in top if is_manifest(f)], [f for f in top if is_image(f)]
    if top_manifests and top_images:
        names = lambda fs_: ", ".join(posixpath.basename(f) for f in fs_[:3]) + (", ..." if len(fs_) > 3 else "")  # noqa: E731
        ext = posixpath.splitext(top_images[0])[1]
        raise ManifestError(f"{redact_uri(spec)} holds both manifest files ({names(top_manifests)}) and images "
                            f"({names(top_images)}): pass the manifest file itself (e.g. "
                            f"{redact_uri(fs.unstrip_protocol(top_manifests[0]))}) or a glob of the images "
                            f"(e.g. '{redact_uri(fs.unstrip_protocol(posixpath.join(base, '*' + ext)))}')")
    manifests, images = [f for f in found if is_manifest(f)], [f for f in found if is_image(f)]
    if top_manifests or (manifests and not images):
        return Listing(fs, "manifests", manifests, base)
    if images:
        return Listing(fs, "images", images, base)
    tar_files = [f for f in found if name_of(f).endswith(tars.TAR_EXTS)]
    if tar_files:
        return Listing(fs, "tars", tar_files, base)  # in the order named (brace ranges) or listed
    raise ManifestError(f"no manifest or image files found at {redact_uri(spec)}")
