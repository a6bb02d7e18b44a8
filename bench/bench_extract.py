#!/usr/bin/env python
"""Extraction benchmarks for igpt_batch, all measured in this one process.

Sections (each prints `name: value` lines; ratios are plain numbers):

  extract     bare-model images/s (features at n_layer // 2, the job's default layer) for the chosen
              model, plus the committed demo model when it exists.
  pipeline    end-to-end images/s of the production shard path (igpt_batch.run.worker.ShardWorker.run over
              real JPEG files: plan rows -> decode ahead in threads -> Extractor (tokenise -> features)
              -> Parquet (zstd) -> commit marker), divided by bare-model images/s (Extractor.features on
              pre-tokenised batches of the same model and batch size)  -> pipeline_efficiency.
  truncation  seconds for features at layer n_layer // 2 divided by seconds at full depth -> truncation_ratio
              (target <= 0.55; blocks past the deepest requested layer are never run).
  tokenize    palette.tokenize vs transformers' ImageGPTImageProcessor(...)(images)["input_ids"] on the
              same images, tokens checked equal -> tokenize_speedup (target >= 10). Measured twice: on
              images already resized to n_px (tokenisation alone; the headline figure) and on the full
              decoded photos (our resize + tokenize vs the processor's own resize + quantise).
  scaling     2 Ray CPU actors vs 1 (torch threads 1 per actor, tiny model) -> scaling_ratio.
  dtype       the CPU flags seen (/proc/cpuinfo: avx2, avx512f, avx512_bf16, amx_bf16), what --dtype auto resolves to
              here, and bare-model images/s in fp32 and in bf16 (same shape, layer, batch) -> bf16_over_fp32.
  gpu         (--preset medium-gpu, or reduced on CPU with --smoke) imagegpt-medium shape, random weights,
              bf16: images/s and MFU at layer 20 and at full depth, against a bf16 matmul peak measured
              in this process.

Examples:
    python bench/bench_extract.py                       # CPU, imagegpt-small shape (random weights)
    python bench/bench_extract.py --model demo          # the committed demo checkpoint
    python bench/bench_extract.py --skip scaling        # leave a section out
    python bench/bench_extract.py --preset medium-gpu   # CUDA, bf16, imagegpt-medium shape
    python bench/bench_extract.py --smoke               # tiny everything, well under 30 s on CPU

Timings on a shared machine are noisy: every measurement is the best of --reps interleaved repetitions.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from common import note, random_clusters, random_hf, say, timed  # noqa: E402
from PIL import Image  # noqa: E402

from igpt_batch.inputs import images  # noqa: E402
from igpt_batch.model import dtypes, palette  # noqa: E402
from igpt_batch.model.extractor import Extractor  # noqa: E402
from igpt_batch.model.loading import load_model, resolve_device  # noqa: E402
from igpt_batch.model.resolve import DEMO_MODEL_DIR  # noqa: E402
from igpt_batch.model.transformer import DTYPES, IGPT  # noqa: E402

SECTIONS = ("extract", "pipeline", "truncation", "tokenize", "scaling", "dtype", "gpu")
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the CPU flags the dtype section prints
SHAPES = {  # name -> (n_px, n_embd, n_layer, n_head, vocab_size incl. SOS)
    "small": (32, 512, 24, 8, 513),   # openai/imagegpt-small
    "medium": (32, 1024, 36, 8, 513),  # openai/imagegpt-medium
    "tiny": (8, 32, 4, 4, 17),        # --smoke
    "scaling": (16, 128, 4, 4, 65),   # the Ray scaling section
}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")
JPEG_SIZES = (64, 256, 512, 1024)  # longest side of the re-encoded JPEGs


# ----------------------------------------------------------------------------- helpers


def best_interleaved(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Run every fn once per repetition, alternating, and keep each one's fastest time.

    Alternating spreads background load evenly over the things being compared; the minimum is the
    least disturbed run.
    """
    best = {name: math.inf for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, device))
    return best


def random_model(shape: tuple, dtype: str = "fp32", device: str | torch.device = "cpu", seed: int = 0) -> IGPT:
    """An IGPT over a randomly initialised HF ImageGPT of the given shape, with a random palette."""
    n_px, n_embd, n_layer, n_head, vocab = shape
    hf = random_hf(dict(vocab_size=vocab, n_positions=n_px * n_px, n_embd=n_embd, n_layer=n_layer, n_head=n_head),
                   DTYPES[dtype], device, seed)
    return IGPT(hf, random_clusters(vocab, seed))


def describe(model: IGPT) -> str:
    return (f"n_px={model.n_px} n_embd={model.n_embd} n_layer={model.n_layer} n_head={model.n_head} "
            f"vocab={model.vocab_size} dtype={str(model.dtype).replace('torch.', '')} device={model.device}")


def jpeg_corpus(names=PHOTOS, sizes=JPEG_SIZES, quality: int = 90) -> list[bytes]:
    """scikit-image's sample photos re-encoded as JPEG with their longest side at each size."""
    from skimage import data

    out = []
    for name in names:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        img = Image.fromarray(arr[:, :, :3])
        w, h = img.size
        for size in sizes:
            scale = size / max(w, h)
            small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=quality)
            out.append(buf.getvalue())
    return out


def take(items: list, n: int) -> list:
    """n items cycling through `items`."""
    return [items[i % len(items)] for i in range(n)]


def decode_resize(data: bytes, n_px: int) -> np.ndarray:
    return images.resize(images.decode(data), n_px)


def features_np(model: IGPT, tokens: np.ndarray, layers: list[int]) -> np.ndarray:
    """The production feature call (igpt_batch.model.extractor.Extractor) on pre-tokenised images."""
    return Extractor(model, layers, batch_size=max(1, len(tokens))).features(tokens)


def save_checkpoint(model: IGPT, path: Path) -> str:
    """Save a (random) model in the openai checkpoint format, so the production worker can load it."""
    model.hf.save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"clusters": model.clusters.tolist(), "size": {"height": model.n_px, "width": model.n_px},
         "image_processor_type": "ImageGPTImageProcessor", "do_normalize": True, "do_resize": True}))
    return str(path)


class ProductionShard:
    """One shard of JPEG files run through the production path, ShardWorker.run: read the plan -> decode ahead in
    threads -> Extractor (tokenise -> features) -> Parquet (zstd) -> commit marker."""

    def __init__(self, model: IGPT, jpegs: list[bytes], batch: int, layers: list[int], workdir: Path):
        from igpt_batch import config
        from igpt_batch.inputs.manifest import ManifestScan, Shard
        from igpt_batch.model import checkpoint
        from igpt_batch.run.job import Job
        from igpt_batch.run.storage import OutputFolder
        from igpt_batch.run.tasks.extract import Extract
        from igpt_batch.run.worker import ShardWorker

        ckpt = save_checkpoint(model, workdir / "ckpt")
        uris = []
        for i, data in enumerate(jpegs):
            uris.append(str(workdir / f"img-{i:06d}.jpg"))
            Path(uris[-1]).write_bytes(data)
        dtype = {v: k for k, v in DTYPES.items()}[model.dtype]
        cfg = config.load(None, {"model.name": ckpt, "model.dtype": dtype, "model.device": str(model.device),
                                 "output.path": str(workdir / "out"), "extract.batch_size": batch,
                                 "extract.layers": layers, "run.shard_size": len(uris), "output.contact_sheet": 0})
        task = Extract()
        self.shard, self.rows = Shard(0, 0, len(uris)), len(uris)
        with OutputFolder(cfg.output.path).plan_writer() as plan:
            plan.add(self.shard, pa.table({"id": [f"img-{i:06d}" for i in range(len(uris))], "uri": uris}))
        scan = ManifestScan(len(uris), "", kind="uri")  # the plan rows name files to read
        self.worker = ShardWorker(Job(cfg, task, task.resolve(cfg, checkpoint.read_info(ckpt)),
                                      task.plan(cfg, scan)))
        self.worker.load()

    def run(self) -> None:
        record = self.worker.run(self.shard)
        assert record["rows"]["embeddings"] == self.rows, record


# ----------------------------------------------------------------------------- sections


def bare_images_per_s(model: IGPT, tokens: np.ndarray, batch: int, layers: list[int], reps: int) -> float:
    batches = [tokens[i:i + batch] for i in range(0, len(tokens), batch)]
    t = best_interleaved({"bare": lambda: [features_np(model, b, layers) for b in batches]}, reps, model.device)
    return len(tokens) / t["bare"]


def section_extract(model: IGPT, label: str, batch: int, n_images: int, reps: int, rng) -> float:
    layer = model.n_layer // 2
    tokens = rng.integers(0, model.vocab_size - 1, (n_images, model.n_positions))
    features_np(model, tokens[:batch], [1])  # warm-up
    rate = bare_images_per_s(model, tokens, batch, [layer], reps)
    note(f"{label}: {describe(model)}, layer {layer}, batch {batch}, {n_images} images")
    say(f"extract_{label}_images_per_s", rate)
    return rate


def section_dtype(make_model, label: str, batch: int, n_images: int, reps: int, rng) -> float:
    """fp32 and bf16 bare-model images/s of one model (make_model(dtype) builds it), and the CPU flags seen."""
    flags = dtypes.cpu_flags()
    report = dtypes.hardware("cpu")
    say("cpu_flags", " ".join(f for f in SHOWN_FLAGS if f in flags) or "none")
    say("dtype_auto_cpu", dtypes.resolve("auto", report))
    rates = {}
    for dtype in ("fp32", "bf16"):
        model = make_model(dtype)
        tokens = rng.integers(0, model.vocab_size - 1, (n_images, model.n_positions))
        features_np(model, tokens[:batch], [1])  # warm-up
        rates[dtype] = bare_images_per_s(model, tokens, batch, [model.n_layer // 2], reps)
        note(f"dtype {dtype}: {describe(model)}, layer {model.n_layer // 2}, batch {batch}")
        say(f"dtype_{label}_{dtype}_images_per_s", rates[dtype])
    say("bf16_over_fp32", rates["bf16"] / rates["fp32"])
    return rates["bf16"] / rates["fp32"]


def section_pipeline(model: IGPT, jpegs: list[bytes], batch: int, n_images: int, reps: int) -> float:
    layer = model.n_layer // 2
    corpus = take(jpegs, n_images)
    sizes = sorted({Image.open(io.BytesIO(d)).size for d in jpegs}, key=max)
    note(f"pipeline: {len(jpegs)} distinct JPEGs ({sizes[0]} .. {sizes[-1]} px, "
         f"{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB average), {n_images} images, batch {batch}, "
         f"layer {layer}, the production ShardWorker (4 decode threads), torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        shard = ProductionShard(model, corpus, batch, [layer], Path(tmp))
        worker_model = shard.worker.model  # both sides run the same weights in the same process
        rgb = np.stack([decode_resize(d, model.n_px) for d in corpus])
        extractor = Extractor(worker_model, [layer], batch)
        batches = [t for t in np.array_split(extractor.tokens(rgb), max(1, n_images // batch))]
        extractor.features(batches[0])  # warm-up
        shard.run()  # warm-up: threads, codecs, Parquet writer
        t = best_interleaved({"bare": lambda: [extractor.features(b) for b in batches], "e2e": shard.run},
                             reps, model.device)
    # decode alone, single thread, for context
    t_dec = min(timed(lambda: [decode_resize(d, model.n_px) for d in corpus], torch.device("cpu"))
                for _ in range(max(1, reps)))
    bare, e2e = n_images / t["bare"], n_images / t["e2e"]
    say("decode_resize_images_per_s_1thread", n_images / t_dec)
    say("bare_model_images_per_s", bare)
    say("pipeline_images_per_s", e2e)
    say("pipeline_efficiency", e2e / bare)
    return e2e / bare


def section_truncation(model: IGPT, batch: int, reps: int, rng) -> float:
    half, full = model.n_layer // 2, model.n_layer
    tokens = rng.integers(0, model.vocab_size - 1, (batch, model.n_positions))
    features_np(model, tokens, [1])  # warm-up
    t = best_interleaved({"half": lambda: features_np(model, tokens, [half]),
                          "full": lambda: features_np(model, tokens, [full])}, reps, model.device)
    note(f"truncation: batch {batch}, layer {half} vs {full}")
    say(f"features_layer{half}_s", t["half"])
    say(f"features_layer{full}_s", t["full"])
    say("truncation_ratio", t["half"] / t["full"])
    return t["half"] / t["full"]


def section_tokenize(model: IGPT, jpegs: list[bytes], n_images: int, reps: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torchvision not available, falling back to the PIL backend"
        from transformers import ImageGPTImageProcessor

        proc = ImageGPTImageProcessor(clusters=model.clusters, size={"height": model.n_px, "width": model.n_px})
    n_px, clusters = model.n_px, model.clusters
    decoded = [images.decode(d) for d in take(jpegs, n_images)]  # full-size RGB PIL images
    resized = [images.resize(img, n_px) for img in decoded]  # uint8 (n_px, n_px, 3)
    cpu = torch.device("cpu")

    def hf(imgs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return proc(images=imgs, return_tensors="np")["input_ids"]

    ours_small = palette.tokenize(np.stack(resized), clusters)
    hf_small = hf(resized)
    ours_full = palette.tokenize(np.stack([images.resize(img, n_px) for img in decoded]), clusters)
    hf_full = hf(decoded)
    equal = np.array_equal(ours_small, hf_small) and np.array_equal(ours_full, hf_full)
    t = best_interleaved({
        "ours": lambda: palette.tokenize(np.stack(resized), clusters),
        "hf": lambda: hf(resized),
        "ours_full": lambda: palette.tokenize(np.stack([images.resize(img, n_px) for img in decoded]), clusters),
        "hf_full": lambda: hf(decoded),
    }, reps, cpu)
    note(f"tokenize: {n_images} images, {len(clusters)} clusters, n_px {n_px}; "
         f"'resized' = both given the same {n_px}x{n_px} uint8 images, 'full' = both given the decoded photos")
    say("tokenize_ours_images_per_s", n_images / t["ours"])
    say("tokenize_hf_images_per_s", n_images / t["hf"])
    say("tokenize_speedup", t["hf"] / t["ours"])
    say("preprocess_full_ours_images_per_s", n_images / t["ours_full"])
    say("preprocess_full_hf_images_per_s", n_images / t["hf_full"])
    say("preprocess_full_speedup", t["hf_full"] / t["ours_full"])
    say("tokens_equal", "equal" if equal else "DIFFERENT")
    return t["hf"] / t["ours"]


class ScaleActor:
    """One Ray actor holding a random model (same seed -> same weights in every actor)."""

    def __init__(self, shape: tuple, threads: int = 1):
        import torch as _torch

        _torch.set_num_threads(threads)
        self.model = random_model(shape)
        self.layers = [self.model.n_layer // 2]

    def run(self, tokens: np.ndarray) -> int:
        features_np(self.model, tokens, self.layers)
        return len(tokens)

    def threads(self) -> int:
        return torch.get_num_threads()


def section_scaling(shape: tuple, batch: int, calls: int, reps: int) -> float:
    import common
    import ray

    ray.cloudpickle.register_pickle_by_value(common)  # the actors need not find bench/ on their path
    if __name__ != "__main__":  # imported (not run as a script): ship this module's code to the actors
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        actor_cls = ray.remote(num_cpus=1)(ScaleActor)
        actors = [actor_cls.remote(shape, 1) for _ in range(2)]
        rng = np.random.default_rng(1)
        n_px, vocab = shape[0], shape[4]
        tokens = ray.put(rng.integers(0, vocab - 1, (batch, n_px * n_px)))
        threads = ray.get([a.threads.remote() for a in actors])
        ray.get([a.run.remote(tokens) for a in actors])  # warm-up both

        def throughput(k: int) -> float:
            t0 = time.perf_counter()
            done = sum(ray.get([actors[i % k].run.remote(tokens) for i in range(calls)]))
            return done / (time.perf_counter() - t0)

        best = {1: 0.0, 2: 0.0}
        for _ in range(reps):
            for k in (1, 2):
                best[k] = max(best[k], throughput(k))
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    note(f"scaling: n_px={shape[0]} n_embd={shape[1]} n_layer={shape[2]}, batch {batch}, {calls} calls, "
         f"torch threads per actor {threads}, num_cpus=1 per actor, Ray num_cpus=2")
    say("ray_1_actor_images_per_s", best[1])
    say("ray_2_actors_images_per_s", best[2])
    say("scaling_ratio", best[2] / best[1])
    return best[2] / best[1]


def model_flops_per_image(tokens: int, d: int, blocks: int) -> float:
    """Forward FLOPs of `blocks` transformer blocks for one image of `tokens` positions, width d.

    FLOPs ~= 2 * tokens * (12 * L * d^2)       weight matmuls: qkv 3d^2 + proj d^2 + mlp 8d^2 MACs per token
           + 2 * tokens^2 * d * L * 2          attention: QK^T and AV, tokens^2 * d MACs each per block
    (2 FLOPs per multiply-add; the attention term counts the full square, as is customary for MFU,
    although causal kernels skip the masked half; embeddings, norms and the mean pool are ignored.)
    """
    return 2 * tokens * (12 * blocks * d * d) + 2 * tokens * tokens * d * blocks * 2


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Best-of-3 FLOP/s of an n x n x n torch.matmul (the practical peak this process can reach)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up (cuBLAS heuristics, clocks)
    best = min(timed(lambda: [torch.matmul(a, b, out=c) for _ in range(iters)], device) for _ in range(3))
    return 2 * n**3 * iters / best


def section_gpu(shape: tuple, dtype: str, device: torch.device, batch: int, layers: list[int], reps: int,
                matmul_n: int, matmul_iters: int, label: str) -> None:
    model = random_model(shape, dtype, device)
    peak = matmul_peak_flops(device, DTYPES[dtype], matmul_n, matmul_iters)
    rng = np.random.default_rng(2)
    tokens = torch.from_numpy(rng.integers(0, model.vocab_size - 1, (batch, model.n_positions))).to(device)
    note(f"{label}: {describe(model)}, batch {batch}, matmul {matmul_n}^3 {dtype} peak {peak / 1e12:.3f} TFLOP/s")
    say(f"{label}_matmul_peak_tflops", peak / 1e12)
    with torch.inference_mode():
        model.features(tokens, [max(layers)])  # warm-up at full size (kernels, allocator)
        t = best_interleaved({layer: (lambda l=layer, m=model, x=tokens: m.features(x, [l])) for layer in layers}, reps,
                             device)
    for layer in layers:
        flops = model_flops_per_image(model.n_positions, model.n_embd, layer) * batch
        say(f"{label}_layer{layer}_images_per_s", batch / t[layer])
        say(f"{label}_layer{layer}_mfu", flops / t[layer] / peak)
    del model, tokens
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main


def load_named_model(name: str, dtype: str, device: str) -> tuple[IGPT, str]:
    if name == "small":
        return random_model(SHAPES["small"], dtype, resolve_device(device)), "small_random"
    if name == "demo" and not (DEMO_MODEL_DIR / "config.json").exists():
        sys.exit(f"demo model not found: {DEMO_MODEL_DIR} does not exist yet "
                 f"(train it with `python -m igpt_batch.train_demo --out {DEMO_MODEL_DIR}`)")
    return load_model(name, dtype, device), "demo" if name == "demo" else "model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small",
                   help="'small' (random imagegpt-small shape, default), 'demo', a checkpoint folder or hub id")
    p.add_argument("--preset", choices=["medium-gpu"], help="only the GPU section: imagegpt-medium shape, bf16, CUDA")
    p.add_argument("--smoke", action="store_true", help="tiny model, every section reduced (seconds on CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    p.add_argument("--batch", type=int, help="images per model call (default 8 on CPU, 64 for medium-gpu)")
    p.add_argument("--batches", type=int, default=2, help="batches per timed pipeline / extraction run")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions; the best is kept")
    p.add_argument("--tokenize-images", dest="tokenize_images", type=int, default=64)
    p.add_argument("--device", default="cpu", help="device for the main model (auto, cpu, cuda, cuda:N)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES) + ["auto"],
                   help="the main model's dtype; auto: bf16 where this hardware computes it natively")
    p.add_argument("--threads", type=int, help="torch intra-op threads in this process (default: torch's choice)")
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = dtypes.resolve("auto", dtypes.hardware(args.device))
    if args.batch is None:
        args.batch = 64 if args.preset == "medium-gpu" else 8
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    skip = set(args.skip)
    print(f"config: {'smoke' if args.smoke else args.preset or 'cpu'} batch={args.batch} reps={args.reps} "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()} torch={torch.__version__}", flush=True)

    if args.preset == "medium-gpu":
        if not torch.cuda.is_available():
            sys.exit("--preset medium-gpu needs a CUDA GPU, and torch sees none (use --smoke for the CPU code path)")
        device = resolve_device("cuda" if args.device == "cpu" else args.device)
        section_gpu(SHAPES["medium"], "bf16", device, args.batch, [20, SHAPES["medium"][2]], max(args.reps, 3),
                    matmul_n=8192, matmul_iters=20, label="gpu")
        say("total_s", time.perf_counter() - t_start)
        return

    if args.smoke:
        model, label = random_model(SHAPES["tiny"]), "tiny_random"
        jpegs = jpeg_corpus(PHOTOS[:2], (64, 256))
        batch, n_images, reps, tok_images = 4, 8, 1, 8
    else:
        model, label = load_named_model(args.model, args.dtype, args.device)
        jpegs = jpeg_corpus()
        batch, n_images, reps, tok_images = args.batch, args.batch * args.batches, args.reps, args.tokenize_images

    if "extract" not in skip:
        section_extract(model, label, batch, n_images, reps, rng)
        if label not in ("demo",):
            if (DEMO_MODEL_DIR / "config.json").exists():
                section_extract(load_model("demo", "fp32", "cpu"), "demo", batch, n_images, reps, rng)
            else:
                say("extract_demo", f"skipped: {DEMO_MODEL_DIR} does not exist yet (python -m igpt_batch.train_demo)")
    if "pipeline" not in skip:
        section_pipeline(model, jpegs, batch, n_images, reps)
    if "truncation" not in skip:
        section_truncation(model, batch, reps, rng)
    if "tokenize" not in skip:
        section_tokenize(model, jpegs, tok_images, max(reps, 2))
    if "scaling" not in skip:
        if args.smoke:
            section_scaling((8, 32, 2, 4, 17), batch=4, calls=4, reps=1)
        else:
            section_scaling(SHAPES["scaling"], batch=16, calls=16, reps=reps)
    if "dtype" not in skip:
        if args.smoke:
            section_dtype(lambda dt: random_model(SHAPES["tiny"], dt), "tiny_random", batch, n_images, reps, rng)
        else:
            section_dtype(lambda dt: load_named_model(args.model, dt, args.device)[0], label, batch, n_images, reps, rng)
    if "gpu" not in skip and args.smoke:
        # the GPU section's code path, reduced: tiny model, fp32 on CPU, small matmul
        section_gpu(SHAPES["tiny"], "fp32", torch.device("cpu"), 4, [2, SHAPES["tiny"][2]], 1,
                    matmul_n=128, matmul_iters=2, label="gpu_smoke_cpu")
    say("total_s", time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
