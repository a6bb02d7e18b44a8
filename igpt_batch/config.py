"""Typed job configuration: dataclass defaults, YAML files and CLI flags override them, validated before any work."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igpt_batch.config_file import read_yaml
from igpt_batch.errors import ConfigError
from igpt_batch.redact import redact_secrets, redact_uri

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # input.max_bytes (also the fetch functions' default)
DEFAULT_MAX_PIXELS = 64_000_000  # input.max_pixels (also the decode functions' default)
MAX_SEED = 2**63  # seeds are int64 on disk and in the sampler's hash


@dataclass
class ModelConfig:
    name: str = "demo"  # "demo", a local checkpoint folder, or a hub id such as openai/imagegpt-medium
    dtype: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 where the hardware computes it natively, else fp32)
    dtype_auto_from: str = ""  # set by the driver when dtype was auto: the hardware it resolved from (workers check)
    device: str = "auto"  # auto picks CUDA when present, else cpu; or cpu / cuda / cuda:N
    compile: bool = True  # CUDA only: torch.compile the decode step (falls back to eager on failure)
    decode_buckets: int = 8  # compiled decode attends over the position rounded up to n_positions/N (1 = whole cache)


@dataclass
class InputConfig:
    manifest: str | None = None  # Parquet/CSV/JSONL file, folder or glob of them, or a folder/glob of images
    read_timeout: float = 30.0  # seconds per image fetch (HTTP and object storage)
    max_bytes: int = DEFAULT_MAX_BYTES  # larger image files are rejected as read errors
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit, checked before decoding
    draft: bool = False  # JPEG draft-mode decoding for sources much larger than n_px (approximate, faster)
    id_column: str = "id"  # the manifest's id column (img2dataset: key); absent = the uri is the id
    uri_column: str = "uri"  # the manifest's uri column (img2dataset: url)
    bytes_column: str | None = None  # Parquet column holding the encoded image (jpg, or a struct field: image.bytes)
    member_column: str | None = None  # Parquet column naming a WebDataset tar member (uri = tar#member); refresh's own
    retries: int = 2  # http(s): retries of 429, 5xx and connection resets (backoff, jitter, Retry-After)
    host_connections: int = 4  # http(s): connections at a time per host, per worker


@dataclass
class OutputConfig:
    path: str | None = None  # local folder or any fsspec URL (s3://bucket/prefix)
    overwrite: bool = False  # replace an existing output written with an incompatible config
    format: str = "parquet"  # embeddings as Parquet parts, or "lance": one Lance dataset (extract only)
    lance_commit_s: float = 30.0  # lance: seconds between the driver's commits of arrived shards (0: each as it comes)
    write_png_files: bool = False  # generate/complete: also write each sample as pngs/<name>.png
    contact_sheet: int = 64  # generate/complete: put the first N samples in contact_sheet.png (0 = none)
    preview: int = 0  # extract: write preview.png with the first N inputs beside their quantised versions
    report: bool = True  # write report.html (summary, throughput, errors, embedding map, pictures) beside _SUCCESS


@dataclass
class ExtractConfig:
    layers: list[int] = field(default_factory=list)  # empty = n_layer // 2 (the paper's best probes are mid-network)
    batch_size: int | str = 32  # or "auto": the largest that fits on the GPU
    score: bool = False  # add nll_bits (mean -log2 p(token) over the image, full depth) from the same pass


@dataclass
class GenerateConfig:
    num_samples: int = 64  # generate: seeds seed .. seed+num_samples-1
    seed: int = 0  # first seed; one seed names one image
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off; larger than the vocabulary is clamped
    top_p: float = 1.0  # 1 = off
    batch_size: int | str = "auto"  # as many KV caches as fit (GPU memory; on CPU 64, halved to fit), or a number
    prompt_rows: int = 0  # complete: keep the top R pixel rows of each image
    samples_per_image: int = 1  # complete: K completions per image


@dataclass
class RunConfig:
    workers: int = 1  # actors, each holding one model replica
    shard_size: int | str = "auto"  # rows (or seeds) per shard: the unit of output, commit and retry; auto = parts of
    # about 128 MiB for GPU workers, 1024 rows on CPU (resolved once, recorded in _job.json, reused on resume)
    address: str | None = None  # Ray address; None joins RAY_ADDRESS / the job's cluster, else starts a local Ray
    executor: str = "ray"  # ray | local (in-process, no Ray: same code path, for debugging)
    cpus_per_worker: float = 1.0  # Ray CPU resources per actor (fractional is fine)
    gpus_per_worker: float | None = None  # None = 1 when the cluster has GPUs and device is not cpu, else 0
    torch_threads: int = 0  # per-actor torch threads (0 = torch default)
    max_retries: int = 3  # attempts per shard after the first, on actor death or shard failure
    max_error_fraction: float = 1.0  # fail the job when more than this fraction of input rows are errors
    actor_start_timeout: float = 900.0  # seconds a worker may wait to be placed (an autoscaler adding a node)
    lease_timeout: float = 600.0  # seconds after which another job's lease on the output counts as stale


@dataclass
class RefreshConfig:
    store: str | None = None  # embedding store root (local folder or fsspec URL) for `igpt-batch refresh`
    deleted: str = "mark"  # mark | drop: what happens to ids that left the manifest
    keep_current: int = 3  # nights kept as Lance tags (time travel), the last one included (0 = all)
    retry_errors: bool = False  # retry failed rows even when their source is unchanged
    index_min_rows: int = 100_000  # build the IVF-PQ vector index once the table has this many rows
    compact_fragments: int = 32  # compact when this many fragments are smaller than a full one (0 = never)
    plan_bucket_rows: int = 250_000  # manifest rows per planning bucket (hash of id)
    dup_threshold: float | None = None  # cosine: search each night's new and updated rows for near-duplicates
    score: bool = False  # add nll_bits to the current table (extract.score each night); part of the store version
    planning_folder: str = ""  # where planning's _planning/ goes (local to every planning task); empty: in the store


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    run: RunConfig = field(default_factory=RunConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    storage_options: dict = field(default_factory=dict)  # fsspec options (endpoint, keys); never logged or saved

    def to_dict(self, redact: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if redact:
            d["storage_options"] = redact_secrets(d["storage_options"])
            for section, key in (("input", "manifest"), ("output", "path"), ("refresh", "store"), ("run", "address")):
                if d[section][key]:  # URLs may carry user:pass@ or a presigned signature
                    d[section][key] = redact_uri(d[section][key])
        return d


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce/validate one value against a field type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        return _integer(key, value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _integer(key: str, value: Any) -> int:
    """An int from an int, an integral float (YAML's 6.4e+7) or a string such as "64000000" or "64e6"."""
    import decimal

    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            d = decimal.Decimal(value.strip().replace("_", ""))
            if d.is_finite() and d == d.to_integral_value():
                return int(d)
        except decimal.InvalidOperation:
            pass
    raise ConfigError(f"{key} must be an integer, got {value!r}")


def apply(cfg: JobConfig, overrides: dict, prefix: str = "") -> JobConfig:
    """Apply a nested dict of overrides in place; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(type(cfg))
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key '{name}' (known keys here: {known})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of settings, got {value!r}")
            apply(current, value, prefix=f"{name}.")
        else:
            setattr(cfg, key, _check_type(name, value, hints[key]))
    return cfg


def set_dotted(cfg: JobConfig, dotted: str, value: Any) -> None:
    """Apply one 'section.key' override (used for CLI flags)."""
    parts = dotted.split(".")
    nested: dict = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    apply(cfg, nested)


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults <- YAML file <- dotted overrides; then validate."""
    cfg = JobConfig()
    if path:
        data = read_yaml(Path(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        apply(cfg, data)
    for dotted, value in (overrides or {}).items():
        set_dotted(cfg, dotted, value)
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Value checks that need no model or data; raise ConfigError naming the key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key} {msg}")

    need(cfg.model.dtype in ("fp32", "bf16", "fp16", "auto"), "model.dtype",
         f"must be fp32, bf16, fp16 or auto, got {cfg.model.dtype!r}")
    d = cfg.model.device
    need(d in ("auto", "cpu", "cuda") or d.startswith("cuda:"), "model.device", f"must be auto, cpu, cuda or cuda:N, got {d!r}")
    need(all(l >= 0 for l in cfg.extract.layers), "extract.layers", f"must be >= 0, got {cfg.extract.layers}")
    for key, bs in (("extract.batch_size", cfg.extract.batch_size), ("generate.batch_size", cfg.generate.batch_size)):
        need(bs == "auto" or (isinstance(bs, int) and bs >= 1), key, f"must be an integer >= 1 or 'auto', got {bs!r}")
    g = cfg.generate
    need(g.num_samples >= 0, "generate.num_samples", "must be >= 0")
    need(0 <= g.temperature < math.inf, "generate.temperature", f"must be finite and >= 0 (0 = greedy), got {g.temperature}")
    need(0 <= g.seed < MAX_SEED, "generate.seed", f"must be in [0, 2**63), got {g.seed}")
    need(g.seed + g.num_samples <= MAX_SEED, "generate.seed",
         f"+ generate.num_samples must be <= 2**63 (seeds are int64), got {g.seed} + {g.num_samples}")
    need(g.top_k >= 0, "generate.top_k", f"must be >= 0 (0 = off), got {g.top_k}")
    need(0 < g.top_p <= 1, "generate.top_p", f"must be in (0, 1], got {g.top_p}")
    need(g.prompt_rows >= 0, "generate.prompt_rows", "must be >= 0")
    need(g.samples_per_image >= 1, "generate.samples_per_image", "must be >= 1")
    r = cfg.run
    need(r.workers >= 1, "run.workers", "must be >= 1")
    need(r.shard_size == "auto" or (isinstance(r.shard_size, int) and r.shard_size >= 1), "run.shard_size",
         f"must be an integer >= 1 or 'auto', got {r.shard_size!r}")
    need(r.executor in ("ray", "local"), "run.executor", f"must be ray or local, got {r.executor!r}")
    need(0 < r.cpus_per_worker < math.inf, "run.cpus_per_worker", "must be finite and > 0")
    need(r.gpus_per_worker is None or 0 <= r.gpus_per_worker < math.inf, "run.gpus_per_worker", "must be finite and >= 0")
    need(r.torch_threads >= 0, "run.torch_threads", f"must be >= 0 (0 = torch default), got {r.torch_threads}")
    need(r.max_retries >= 0, "run.max_retries", "must be >= 0")
    need(r.actor_start_timeout > 0, "run.actor_start_timeout", "must be > 0 seconds")
    need(r.lease_timeout > 0, "run.lease_timeout", "must be > 0 seconds")
    need(0 <= r.max_error_fraction <= 1, "run.max_error_fraction", "must be in [0, 1]")
    i = cfg.input
    need(0 < i.read_timeout < math.inf, "input.read_timeout", f"must be finite and > 0, got {i.read_timeout}")
    need(i.max_pixels >= 1, "input.max_pixels", f"must be >= 1, got {i.max_pixels}")
    need(i.max_bytes >= 1, "input.max_bytes", f"must be >= 1, got {i.max_bytes}")
    for key in ("id_column", "uri_column", "bytes_column"):
        name = getattr(i, key)
        need(name is None or (name.strip() == name and name != ""), f"input.{key}", f"must be a column name, got {name!r}")
    need(len({i.id_column, i.uri_column, i.bytes_column}) == 3, "input.id_column/uri_column/bytes_column",
         "must name different columns")
    need(0 <= i.retries <= 10, "input.retries", f"must be in [0, 10], got {i.retries}")
    need(i.host_connections >= 1, "input.host_connections", f"must be >= 1, got {i.host_connections}")
    need(cfg.refresh.deleted in ("mark", "drop"), "refresh.deleted", f"must be mark or drop, got {cfg.refresh.deleted!r}")
    need(cfg.model.decode_buckets >= 1, "model.decode_buckets", f"must be an integer >= 1, got {cfg.model.decode_buckets}")
    need(cfg.refresh.index_min_rows >= 1, "refresh.index_min_rows", "must be >= 1")
    need(cfg.refresh.compact_fragments >= 0, "refresh.compact_fragments", "must be >= 0 (0 = never)")
    need(cfg.refresh.plan_bucket_rows >= 1, "refresh.plan_bucket_rows", "must be >= 1")
    need(cfg.refresh.dup_threshold is None or -1 <= cfg.refresh.dup_threshold <= 1, "refresh.dup_threshold",
         "must be a cosine similarity in [-1, 1]")
    need(cfg.refresh.keep_current >= 0, "refresh.keep_current", "must be >= 0 (0 keeps every night's table)")
    need(cfg.output.format in ("parquet", "lance"), "output.format",
         f"must be parquet or lance, got {cfg.output.format!r}")
    need(0 <= cfg.output.lance_commit_s < math.inf, "output.lance_commit_s", "must be finite and >= 0 seconds")
    need(cfg.output.contact_sheet >= 0 and cfg.output.preview >= 0, "output.contact_sheet/preview", "must be >= 0")
