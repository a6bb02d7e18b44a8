"""Resolve a checkpoint name to a local folder and read its config, palette and fingerprint (no torch)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt_batch.errors import UsageError, WorkerStartError
from igpt_batch.model.resolve import FIX, ModelRef, locate, node_name, on_node

log = logging.getLogger("igpt_batch")

_VERIFIED: set[tuple[str, str]] = set()  # (folder, fingerprint) hashed by this process: not hashed again


def resolve(name: str, storage_options: dict | None = None) -> str:
    """Return a folder on this node for `name`: "demo", a local checkpoint folder, an object-store folder
    (s3://..., downloaded into this node's model cache) or a hub id (e.g. openai/imagegpt-small).

    Hub ids go through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE apply) and fetch only
    JSON and safetensors files, so a checkpoint without safetensors weights fails at load time.
    """
    return locate(name, storage_options, weights_fingerprint)[1]


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
    ref: ModelRef | None = None  # what each worker resolves on its own node (path is the driver's copy)

    @property
    def n_tokens(self) -> int:
        return self.n_px * self.n_px

    @property
    def sos_id(self) -> int:
        return self.vocab_size - 1


# config.json fields that change what the model computes, with transformers' defaults for absent ones;
# cosmetic fields (transformers_version, architectures, _name_or_path, ...) stay out of the fingerprint
MODEL_CONFIG_DEFAULTS = {
    "model_type": None, "vocab_size": None, "n_positions": None, "n_embd": None, "n_layer": None, "n_head": None,
    "n_inner": None, "activation_function": "quick_gelu", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": False,
}
REQUIRED_INTS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
LEGACY_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers saved by transformers 4.x, ignored on load


def _read_json(file: Path) -> dict:
    """A checkpoint's JSON file as a dict, or a ValueError naming the file."""
    if not file.is_file():
        raise UsageError(f"{file} is missing: an ImageGPT checkpoint needs config.json, "
                         "preprocessor_config.json (with clusters) and *.safetensors")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_model_config(path: str) -> dict:
    """config.json, checked: an ImageGPT with positive integer sizes, a square number of positions."""
    file = Path(path) / "config.json"
    cfg = _read_json(file)
    if cfg.get("model_type") != "imagegpt":
        raise UsageError(f"{path} is not an ImageGPT checkpoint (model_type={cfg.get('model_type')!r})")
    for key in REQUIRED_INTS:
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{file}: {key} must be a positive integer, got {v!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UsageError(f"{file}: n_embd {cfg['n_embd']} is not divisible by n_head {cfg['n_head']}")
    if round(cfg["n_positions"] ** 0.5) ** 2 != cfg["n_positions"]:
        raise UsageError(f"{file}: n_positions must be a square (n_px * n_px), got {cfg['n_positions']}")
    return cfg


def read_clusters(path: str) -> np.ndarray:
    """The (K, 3) float32 palette in [-1, 1] from preprocessor_config.json."""
    cfg_file = Path(path) / "preprocessor_config.json"
    data = _read_json(cfg_file)
    if "clusters" not in data:
        raise UsageError(f"{cfg_file} has no 'clusters': an ImageGPT image processor config lists its colour clusters")
    try:
        clusters = np.asarray(data["clusters"], dtype=np.float32)
    except (TypeError, ValueError):
        raise UsageError(f"clusters in {cfg_file} must be a list of [r, g, b] numbers") from None
    if clusters.ndim != 2 or clusters.shape[1] != 3 or not np.isfinite(clusters).all():
        raise UsageError(f"clusters in {cfg_file} must be finite numbers of shape (K, 3), got shape {clusters.shape}")
    return clusters


def expected_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor an ImageGPTForCausalImageModeling checkpoint holds, with its shape (Conv1D weights are (in, out))."""
    c, v, p = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    inner = cfg.get("n_inner") or 4 * c
    shapes = {"transformer.wte.weight": (v, c), "transformer.wpe.weight": (p, c), "transformer.ln_f.weight": (c,),
              "lm_head.weight": (v - 1, c)}  # no logit for SOS
    block = {"ln_1.weight": (c,), "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
             "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,), "ln_2.weight": (c,),
             "mlp.c_fc.weight": (c, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, c), "mlp.c_proj.bias": (c,)}
    for i in range(cfg["n_layer"]):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in block.items()})
    return shapes


def _weight_files(path: str) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UsageError(f"no *.safetensors weights in {path}: only safetensors checkpoints are accepted")
    return files


def _tensor_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors headers only (no tensor data is read)."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    if k in found:
                        raise UsageError(f"tensor {k} appears in more than one safetensors file ({f.name} and another)")
                    sl = st.get_slice(k)
                    found[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except ValueError:
            raise
        except Exception as e:  # SafetensorError: a truncated or garbled file
            raise UsageError(f"corrupt safetensors file {f}: {e}") from None
    return found


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights(path: str, cfg: dict) -> None:
    """Refuse weights that would not give the model config.json describes: missing, unexpected,
    misshapen or non-float tensors, each named. Reads the safetensors headers only."""
    found = _tensor_headers(_weight_files(path))
    want = expected_tensors(cfg)
    missing = [k for k in want if k not in found]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete: {len(missing)} tensors missing: {_names(missing)}")
    extra = [k for k in found if k not in want and not k.endswith(LEGACY_BUFFERS)]
    if extra:
        raise UsageError(f"checkpoint {path} has {len(extra)} unexpected tensors: {_names(extra)} "
                         "(not an ImageGPT of the shape config.json describes)")
    for k, shape in want.items():
        if found[k][0] != shape:
            raise UsageError(f"checkpoint {path}: tensor {k} has shape {list(found[k][0])}, "
                             f"config.json says {list(shape)}")
        if found[k][1] not in FLOAT_DTYPES:
            raise UsageError(f"checkpoint {path}: tensor {k} has dtype {found[k][1]}, expected a float type")


def weights_fingerprint(path: str, cfg: dict | None = None, clusters: np.ndarray | None = None) -> str:
    """sha256 over everything that decides the output: the model-relevant config.json fields, the clusters and
    the safetensors files (names and bytes); first 16 hex chars."""
    cfg = read_model_config(path) if cfg is None else cfg
    clusters = read_clusters(path) if clusters is None else clusters
    model = {k: cfg.get(k, default) for k, default in MODEL_CONFIG_DEFAULTS.items()}
    h = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
    h.update(np.ascontiguousarray(clusters, dtype="<f4").tobytes())
    for f in _weight_files(path):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_info(name: str, storage_options: dict | None = None) -> CheckpointInfo:
    """Resolve and check a checkpoint before any work: config, clusters and every weight tensor by name and shape."""
    try:
        ref, path = locate(name, storage_options, weights_fingerprint)
    except ValueError:
        if not name.startswith("/") or not _on_a_cluster():
            raise
        return read_on_cluster(name)  # a folder only the workers have (baked into their image)
    return read_folder(path, ref)


def _on_a_cluster() -> bool:
    """A driver of a cluster job (`ray job submit` sets RAY_ADDRESS): its workers may hold folders it lacks. Not
    merely a process that happens to have Ray initialised, so the answer does not depend on what ran before."""
    return bool(os.environ.get("RAY_ADDRESS"))


def _probe(path: str) -> CheckpointInfo | None:
    return read_folder(path) if os.path.isdir(path) else None


def read_on_cluster(path: str) -> CheckpointInfo:
    """A folder absent on the driver's node but baked into the workers' image: the first worker node that has it
    reports its config and fingerprint, and every actor then checks its own copy against that one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init(configure_logging=False)  # the job's cluster (RAY_ADDRESS); the executor joins the same one
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    for node in nodes:
        on = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        try:
            info = ray.get(on.remote(path), timeout=300)
        except Exception as e:  # that node cannot answer: ask the next
            log.warning("could not look for model folder %s on Ray node %s: %s", path, node[:12], type(e).__name__)
            continue
        if info is not None:
            log.info("model folder %s is not on the driver's node; Ray node %s has it: fingerprint %s, %d layers, "
                     "%dx%d pixels", path, node[:12], info.weights_fingerprint, info.n_layer, info.n_px, info.n_px)
            return info
    raise UsageError(f"model folder {path} exists neither on the driver's node nor on any of the {len(nodes)} worker "
                     f"node(s): {FIX}")


def read_folder(path: str, ref: ModelRef | None = None) -> CheckpointInfo:
    """A checkpoint folder on this node, checked: its CheckpointInfo (ref: how other nodes find the same model)."""
    from igpt_batch.model.palette import palette_hash

    cfg = read_model_config(path)
    clusters = read_clusters(path)
    if clusters.shape[0] != cfg["vocab_size"] - 1:
        raise UsageError(f"{path}: {clusters.shape[0]} clusters but vocab_size {cfg['vocab_size']} (expected vocab_size - 1 clusters)")
    check_weights(path, cfg)
    fingerprint = weights_fingerprint(path, cfg, clusters)
    _VERIFIED.add((path, fingerprint))
    return CheckpointInfo(
        path=path,
        n_px=math.isqrt(cfg["n_positions"]),
        n_layer=cfg["n_layer"],
        n_embd=cfg["n_embd"],
        n_head=cfg["n_head"],
        vocab_size=cfg["vocab_size"],
        weights_fingerprint=fingerprint,
        palette_hash=palette_hash(clusters),
        ref=ref or ModelRef("folder", path),
    )


def open_on_node(info: CheckpointInfo, storage_options: dict | None = None) -> str:
    """A worker's side: this node's folder for the job's model, whose fingerprint is the driver's; otherwise
    WorkerStartError naming the node and the folder (a different copy never runs)."""
    ref = info.ref or ModelRef("folder", info.path)
    path = on_node(ref, storage_options, weights_fingerprint, info.weights_fingerprint)
    if (path, info.weights_fingerprint) in _VERIFIED or (ref.kind == "url" and Path(path).name == info.weights_fingerprint):
        return path  # hashed by this process already, or this node's cache named the copy by its fingerprint
    try:
        got = weights_fingerprint(path)
    except (OSError, ValueError) as e:
        raise WorkerStartError(f"cannot read model {ref} at {path} on node {node_name()}: {e}") from None
    if got != info.weights_fingerprint:
        raise WorkerStartError(f"model {ref} at {path} on node {node_name()} has weights fingerprint {got}, the job's "
                               f"is {info.weights_fingerprint}: this node holds a different copy; it is not used")
    _VERIFIED.add((path, got))
    return path


def resolve_layers(layers: list[int], n_layer: int) -> list[int]:
    """Validate requested feature layers against the model depth; empty means the default, n_layer // 2.

    Chen et al. (2020, Fig. 3) found linear-probe accuracy peaks near the middle of the network, so the
    default is the middle block: imagegpt-small (24 layers) -> 12, medium (36) -> 18, large (48) -> 24.
    Layer l is the input of block l after its ln_1; l == n_layer is the final ln_f output.
    """
    layers = list(layers) or [n_layer // 2]
    bad = [l for l in layers if not 0 <= l <= n_layer]
    if bad:
        from igpt_batch.errors import ConfigError

        raise ConfigError(f"extract.layers {bad} out of range: this model has {n_layer} layers (valid 0..{n_layer})")
    return layers
