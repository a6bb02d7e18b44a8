"""Where a model lives: the driver turns a --model name into a portable reference, each node turns it back into
a folder of its own (its Hugging Face cache, its object-store download cache, or a folder on that node)."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from igpt_batch.errors import UsageError, WorkerStartError

DEMO_MODEL_DIR = Path(__file__).parent.parent / "demo_model"
WEIGHT_PATTERNS = ["*.json", "*.safetensors"]  # never pickle weights
FIX = ("give every node the model: a folder on a mount shared at the same path, a hub id (each node fetches it "
       "into its own cache), or an object-store URL such as s3://bucket/model (each node downloads it once)")


@dataclass(frozen=True)
class ModelRef:
    """A model name every node can resolve by itself: never a path that only the driver's node has."""

    kind: str  # "demo" (shipped in the package), "hub", "url" (fsspec: s3://, gs://, ...) or "folder"
    location: str  # the hub id, the URL or the absolute folder path
    revision: str | None = None  # hub: the commit the driver found, so every node loads exactly that one

    def __str__(self) -> str:
        return f"{self.location}@{self.revision}" if self.revision else self.location


def is_url(name: str) -> bool:
    """An object-store folder (any fsspec protocol but local files)."""
    proto, sep, _ = name.partition("://")
    return bool(sep) and proto.isidentifier() and proto not in ("file", "local")


def node_name() -> str:
    """This node for messages: the host, and the Ray node id and IP inside a Ray worker."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host} (Ray node {ray.get_runtime_context().get_node_id()[:12]}, {ray.util.get_node_ip_address()})"
    except Exception:  # no Ray, or not in a worker: the host is enough
        pass
    return host


def locate(name: str, storage_options: dict | None, fingerprint_of: Callable[[str], str]) -> tuple[ModelRef, str]:
    """The driver's side: (the portable reference, a folder on this node to read the checkpoint from)."""
    if name == "demo":
        return ModelRef("demo", "demo"), str(DEMO_MODEL_DIR)
    if is_url(name):
        return ModelRef("url", name.rstrip("/")), fetch_url(name, storage_options, fingerprint_of)
    if name.startswith("file://"):
        name = name[len("file://"):]
    if os.path.isdir(os.path.expanduser(name)):
        path = os.path.abspath(os.path.expanduser(name))
        return ModelRef("folder", path), path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UsageError(f"model {name!r} is neither a local checkpoint folder, an object-store URL (s3://...) "
                         "nor a hub id like 'openai/imagegpt-small'")
    path = hub_snapshot(name, None)
    return ModelRef("hub", name, Path(path).name), path  # snapshots/<commit hash>


def hub_snapshot(repo_id: str, revision: str | None) -> str:
    """The snapshot folder in this node's Hugging Face cache (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE of this node)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS)
    except Exception as e:  # offline, unknown repo, no access: one clear message, before any work
        at = f" at revision {revision}" if revision else ""
        raise UsageError(f"cannot fetch model {repo_id!r}{at} from the Hugging Face hub "
                         f"({type(e).__name__}); pass a local checkpoint folder, or check HF_HUB_OFFLINE and access") from e


def on_node(ref: ModelRef, storage_options: dict | None, fingerprint_of: Callable[[str], str],
            fingerprint: str) -> str:
    """A worker's side: this node's folder for `ref`, or WorkerStartError naming the node, the model and the fix."""
    if ref.kind == "demo":
        return str(DEMO_MODEL_DIR)
    if ref.kind == "folder":
        if not os.path.isdir(ref.location):
            raise WorkerStartError(f"model folder {ref.location} does not exist on node {node_name()}: {FIX}")
        return ref.location
    try:
        if ref.kind == "hub":
            return hub_snapshot(ref.location, ref.revision)
        return fetch_url(ref.location, storage_options, fingerprint_of, fingerprint)
    except Exception as e:
        raise WorkerStartError(f"cannot get model {ref} on node {node_name()}: {e}") from None


def cache_root() -> Path:
    """This node's object-store model cache: $IGPT_MODEL_CACHE, else ~/.cache/igpt-batch/models."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "igpt-batch" / "models"
    return Path(os.environ.get("IGPT_MODEL_CACHE") or default)


@contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def fetch_url(url: str, storage_options: dict | None, fingerprint_of: Callable[[str], str],
              expected: str | None = None) -> str:
    """The checkpoint at `url` in this node's cache, in a folder named by its weights fingerprint.

    A copy is downloaded into a temporary folder, fingerprinted and renamed into place, so a reader never sees a
    half-written copy; a lock per URL makes the actors of one node download it once. With `expected` (a worker),
    a cached copy of that fingerprint is used without asking the store; the driver always reads the store.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    if expected and (root / expected).is_dir():
        return str(root / expected)
    with _locked(root / f".{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"):
        if expected and (root / expected).is_dir():  # another actor of this node fetched it while we waited
            return str(root / expected)
        tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=root))
        try:
            _download(url, storage_options or {}, tmp)
            final = root / fingerprint_of(str(tmp))
            try:
                os.rename(tmp, final)
            except OSError:  # the same copy is cached already
                if not final.is_dir():
                    raise
            return str(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _download(url: str, storage_options: dict, dest: Path) -> None:
    """The checkpoint's JSON and safetensors files (top level only) from `url` into `dest`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url.rstrip("/"), **storage_options)
    try:
        names = [p for p in fs.ls(root, detail=False)
                 if any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat) for pat in WEIGHT_PATTERNS)]
    except FileNotFoundError:
        names = []
    if not names:
        raise UsageError(f"no checkpoint at {url}: expected config.json, preprocessor_config.json and "
                         "*.safetensors in that folder")
    for p in names:
        fs.get_file(p, str(dest / p.rsplit("/", 1)[-1]))
