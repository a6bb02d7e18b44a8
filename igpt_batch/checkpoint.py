"""Resolve a checkpoint name to a local folder and read its config, palette and fingerprint (no torch)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
WEIGHT_PATTERNS = ["*.json", "*.safetensors"]  # never pickle weights


def resolve(name: str) -> str:
    """Return a local folder for `name`: "demo", a local checkpoint folder, or a hub id (e.g. openai/imagegpt-small).

    Hub ids go through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE apply) and fetch only
    JSON and safetensors files, so a checkpoint without safetensors weights fails at load time.
    """
    if name == "demo":
        return str(DEMO_MODEL_DIR)
    if os.path.isdir(name):
        return os.path.abspath(name)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ValueError(f"model {name!r} is neither a local checkpoint folder nor a hub id like 'openai/imagegpt-small'")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name, allow_patterns=WEIGHT_PATTERNS)
    except Exception as e:  # offline, unknown repo, no access: one clear message, before any work
        raise FileNotFoundError(f"cannot fetch model {name!r} from the Hugging Face hub "
                                f"({type(e).__name__}); pass a local checkpoint folder, or check HF_HUB_OFFLINE and access") from e


@dataclass(frozen=True)
class CheckpointInfo:
    """What the driver needs to know about a checkpoint without loading it."""

    path: str
    n_px: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int  # includes SOS; SOS id = vocab_size - 1
    weights_fingerprint: str
    palette_hash: str

    @property
    def n_tokens(self) -> int:
        return self.n_px * self.n_px

    @property
    def sos_id(self) -> int:
        return self.vocab_size - 1


def read_clusters(path: str) -> np.ndarray:
    """The (K, 3) float32 palette in [-1, 1] from preprocessor_config.json."""
    cfg_file = Path(path) / "preprocessor_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: an ImageGPT checkpoint needs its image processor config with clusters")
    clusters = np.asarray(json.loads(cfg_file.read_text())["clusters"], dtype=np.float32)
    if clusters.ndim != 2 or clusters.shape[1] != 3:
        raise ValueError(f"clusters in {cfg_file} must have shape (K, 3), got {clusters.shape}")
    return clusters


def weights_fingerprint(path: str) -> str:
    """sha256 over the safetensors files of a checkpoint (names and bytes), first 16 hex chars."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}: only safetensors checkpoints are accepted")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_info(name: str) -> CheckpointInfo:
    from .palette import palette_hash

    path = resolve(name)
    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("model_type") != "imagegpt":
        raise ValueError(f"{path} is not an ImageGPT checkpoint (model_type={cfg.get('model_type')!r})")
    clusters = read_clusters(path)
    n_px = int(round(cfg["n_positions"] ** 0.5))
    if clusters.shape[0] != cfg["vocab_size"] - 1:
        raise ValueError(f"{path}: {clusters.shape[0]} clusters but vocab_size {cfg['vocab_size']} (expected vocab_size - 1 clusters)")
    return CheckpointInfo(
        path=path,
        n_px=n_px,
        n_layer=cfg["n_layer"],
        n_embd=cfg["n_embd"],
        n_head=cfg["n_head"],
        vocab_size=cfg["vocab_size"],
        weights_fingerprint=weights_fingerprint(path),
        palette_hash=palette_hash(clusters),
    )


def resolve_layers(layers: list[int], n_layer: int) -> list[int]:
    """Validate requested feature layers against the model depth; empty means the default, n_layer // 2.

    Chen et al. (2020, Fig. 3) found linear-probe accuracy peaks near the middle of the network, so the
    default is the middle block: imagegpt-small (24 layers) -> 12, medium (36) -> 18, large (48) -> 24.
    Layer l is the input of block l after its ln_1; l == n_layer is the final ln_f output.
    """
    layers = list(layers) or [n_layer // 2]
    bad = [l for l in layers if not 0 <= l <= n_layer]
    if bad:
        from .config import ConfigError

        raise ConfigError(f"extract.layers {bad} out of range: this model has {n_layer} layers (valid 0..{n_layer})")
    return layers
