#!/usr/bin/env python
"""One GPU acceptance run on imagegpt-medium-shaped random weights, offline, written as one JSON file.

    bench/gpu_check.sh [--out gpu_check.json]   # H100/H200: at most about 8 minutes
    bench/gpu_check.sh --smoke --out x.json     # tiny shape on CPU (the compiled path traced, not compiled)

Sections: fp32 greedy tokens against transformers' generate; bf16 compiled-and-bucketed decode against eager
bf16; `--batch-size auto` for both tasks; the sampler and extraction presets (images/s, KV-read floor, MFU).
The JSON is rewritten after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import copy_gbps, random_clusters, random_hf, sync  # noqa: E402
from sampler_breakdown import greedy_prefix  # noqa: E402

from igpt_batch.model import batching  # noqa: E402
from igpt_batch.model.loading import resolve_device  # noqa: E402
from igpt_batch.model.sampling import generate  # noqa: E402
from igpt_batch.model.transformer import IGPT, kv_cache_bytes  # noqa: E402

MEDIUM = dict(n_embd=1024, n_layer=36, n_head=8, n_positions=1024, vocab_size=513)
SMOKE = dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=17)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, seconds (what the tests run)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written (default gpu_check.json)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="sampler batch (default 64; 4 with --smoke)")
    p.add_argument("--buckets", type=int, default=None, help="decode length buckets (default 8; 2 with --smoke)")
    p.add_argument("--layer", type=int, default=None, help="extraction layer (default 20; 1 with --smoke)")
    return p.parse_args(argv)


def build(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple:
    hf = random_hf(shape, dtype, device, seed)
    return hf, IGPT(hf, random_clusters(shape["vocab_size"], seed))


def check_greedy_fp32(shape: dict, device: torch.device, n: int = 64, batch: int = 2) -> dict:
    hf, model = build(shape, torch.float32, device)
    sos = torch.full((batch, 1), model.sos_id, dtype=torch.long, device=device)
    with torch.no_grad():
        ref = hf.generate(input_ids=sos, attention_mask=torch.ones_like(sos), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)[:, 1:].cpu().numpy()
    ours = greedy_prefix(model, batch, n).cpu().numpy()
    return {"positions": n, "batch": batch, "equal": bool(np.array_equal(ours, ref)),
            "agreement": float((ours == ref).mean())}


def teacher_forced(model: IGPT, ids: torch.Tensor) -> torch.Tensor:
    """Decode-step logits (B, T, V-1) for given ids, one position at a time through decode_one_token."""
    cache = model.new_cache(ids.shape[0])
    steps = [model.prefill(ids[:, :1], cache)]
    # clone: a CUDA-graph replay's output buffer is overwritten by the next replay
    steps += [model.decode_one_token(ids[:, p : p + 1], p, cache).clone() for p in range(1, ids.shape[1])]
    return torch.stack(steps, 1).float()


def check_bucketed_bf16(eager: IGPT, compiled: IGPT, batch: int) -> dict:
    """Teacher-forced logits over the first three buckets: compiled-and-bucketed bf16 against eager bf16 (at the
    sampler's batch, so the sampler preset reuses these graphs and the static cache)."""
    n = min(eager.n_positions, 2 * (eager.n_positions // compiled.decode_buckets) + 3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, eager.vocab_size - 1, (batch, n), generator=gen).to(eager.device)
    ids[:, 0] = eager.sos_id
    a, b = teacher_forced(eager, ids), teacher_forced(compiled, ids)
    rel = ((a - b).norm() / a.norm()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return {"positions": n, "buckets": compiled.decode_buckets, "compiled": compiled._compiled_decode is not None,
            "relative_error": rel, "argmax_agreement": agree, "ok": rel < 2e-2 and agree >= 0.95}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)


def matmul_params(model: IGPT) -> int:
    return sum(p.numel() for n, p in model.transformer.h.named_parameters() if p.ndim == 2)


def sampler_preset(model: IGPT, batch: int, gbps: float) -> dict:
    """Full-length bf16 sampling on the compiled, bucketed path: images/s, KV-read floor, MFU."""
    seeds = list(range(batch))
    generate(model, seeds, temperature=1.0)  # warm-up: traces/compiles every bucket
    sync(model.device)
    start = time.perf_counter()
    generate(model, seeds, temperature=1.0)
    sync(model.device)
    seconds = time.perf_counter() - start
    P, C = model.n_positions, model.n_embd
    per_position = batch * kv_cache_bytes(model.config, model.dtype) // P  # K and V, all layers, whole batch
    needed = [1] + [p + 1 for p in range(1, P)]  # prefill [SOS], then decode steps 1..P-1
    attended = [1] + [model.bucket_end(p) for p in range(1, P)]
    flops = batch * sum(2 * matmul_params(model) + 2 * (model.vocab_size - 1) * C + 4 * model.n_layer * C * n
                        for n in needed)
    peak = peak_flops(model.device)
    return {"batch": batch, "seconds": seconds, "images_per_s": batch / seconds, "tokens_per_s": batch * P / seconds,
            "kv_bytes_needed": per_position * sum(needed), "kv_bytes_attended": per_position * sum(attended),
            "kv_floor_fraction": per_position * sum(needed) / (gbps * 1e9) / seconds,
            "kv_attended_bandwidth_fraction": per_position * sum(attended) / (gbps * 1e9) / seconds,
            "compiled": model._compiled_decode is not None, "mfu": flops / seconds / peak if peak else None}


def extraction_preset(model: IGPT, batch: int, layer: int) -> dict:
    P, C = model.n_positions, model.n_embd
    tokens = torch.randint(0, model.vocab_size - 1, (batch, P), device=model.device)
    with torch.inference_mode():
        model.features(tokens, [layer])
        sync(model.device)
        start = time.perf_counter()
        for _ in range(3):
            model.features(tokens, [layer])
        sync(model.device)
    seconds = (time.perf_counter() - start) / 3
    per_layer = matmul_params(model) // model.n_layer
    flops = batch * layer * (2 * per_layer * P + 2 * C * P * P)  # matmuls + causal QK^T and PV (half of 4CP^2)
    peak = peak_flops(model.device)
    return {"batch": batch, "layer": layer, "images_per_s": batch / seconds,
            "mfu": flops / seconds / peak if peak else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    shape, batch = (SMOKE, args.batch or 4) if args.smoke else (MEDIUM, args.batch or 64)
    layer = args.layer or (1 if args.smoke else 20)
    buckets = args.buckets or (2 if args.smoke else 8)
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation
    report = {"smoke": args.smoke, "device": str(device), "torch": torch.__version__, "host": platform.node(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "shape": shape}
    out, t0 = Path(args.out), time.perf_counter()

    def section(name, fn):
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record it and go on to the next section
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["seconds_taken"] = round(time.perf_counter() - start, 2)
        report["elapsed_s"] = round(time.perf_counter() - t0, 2)
        out.write_text(json.dumps(report, indent=2))
        print(f"{name}: {json.dumps(report[name])}", flush=True)

    section("bandwidth", lambda: {"gbps": copy_gbps(device, cpu_mib=64)})
    section("greedy_fp32_vs_hf", lambda: check_greedy_fp32(shape, device, n=min(64, shape["n_positions"])))
    hf, eager = build(shape, torch.bfloat16, device)
    compiled = IGPT(hf, eager.clusters)
    on_cuda = device.type == "cuda"
    compiled.compile_decode(backend="inductor" if on_cuda else "eager", mode="reduce-overhead" if on_cuda else None,
                            require_cuda=False, buckets=buckets)
    section("bucketed_bf16_vs_eager", lambda: check_bucketed_bf16(eager, compiled, batch))
    section("batch_size_auto", lambda: {"extract": batching.extract_batch_size(eager, [layer], "auto"),
                                        "sample": batching.sample_batch_size(eager, "auto")})
    section("sampler_bf16", lambda: sampler_preset(compiled, batch, report["bandwidth"]["gbps"]))
    ext_batch = min(256, report["batch_size_auto"].get("extract", 8)) if not args.smoke else 8
    section("extraction_bf16", lambda: extraction_preset(eager, ext_batch, layer))
    report["ok"] = bool(report["greedy_fp32_vs_hf"].get("equal") and report["bucketed_bf16_vs_eager"].get("ok"))
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} (ok={report['ok']}, {report['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
