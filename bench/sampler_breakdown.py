"""Where a decode step's time goes: matmuls against attention, the bandwidth each reaches, and the machine's own."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from igpt_batch.model.transformer import IGPT, conv1d


def _best(fn, device: torch.device, repeats: int = 3) -> float:
    """Best wall seconds of `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def streaming_gbps(device: torch.device, mib: int = 256) -> float:
    """Read bandwidth of a plain streaming reduction over `mib` MiB (float32), the ceiling for any KV read."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    return x.nbytes / _best(lambda: x.sum(), device) / 1e9


def _weight_bytes(model: IGPT) -> int:
    blocks = sum(p.nbytes for name, p in model.transformer.h.named_parameters() if ".ln_" not in name)
    return blocks + model.hf.lm_head.weight.nbytes


def step_breakdown(model: IGPT, batch: int, pos: int) -> dict:
    """One decode step at position `pos` (the cache filled up to it): total, matmul and attention ms and GB/s.

    Matmuls: every block's four Conv1D matmuls and the head on a (batch, 1, C) input; their bytes are the
    weights'. Attention: SDPA of one query over the `pos + 1` cached positions of every layer; its bytes are
    the K and V it reads."""
    device, C = model.device, model.n_embd
    cache = model.new_cache(batch)
    cache.k.normal_()
    cache.v.normal_()
    ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
    x = torch.randn(batch, 1, C, device=device, dtype=model.dtype)
    h4 = torch.randn(batch, 1, 4 * C, device=device, dtype=model.dtype)
    q = torch.randn(batch, model.n_head, 1, model.head_dim, device=device, dtype=model.dtype)

    def matmuls():
        for blk in model.transformer.h:
            conv1d(x, blk.attn.c_attn), conv1d(x, blk.attn.c_proj), conv1d(x, blk.mlp.c_fc), conv1d(h4, blk.mlp.c_proj)
        F.linear(x, model.hf.lm_head.weight)

    def attention():
        for i in range(model.n_layer):
            F.scaled_dot_product_attention(q, cache.k[i, :, :, : pos + 1], cache.v[i, :, :, : pos + 1])

    with torch.no_grad():
        total_s = _best(lambda: model.decode_one_token(ids, pos, cache), device)
        matmul_s, attention_s = _best(matmuls, device), _best(attention, device)
    kv_bytes = 2 * model.n_layer * batch * (pos + 1) * C * cache.k.element_size()
    return {"batch": batch, "pos": pos, "step_ms": 1e3 * total_s,
            "matmul_ms": 1e3 * matmul_s, "matmul_gbps": _weight_bytes(model) / matmul_s / 1e9,
            "attention_ms": 1e3 * attention_s, "attention_gbps": kv_bytes / attention_s / 1e9,
            "other_ms": 1e3 * max(0.0, total_s - matmul_s - attention_s)}


def format_row(r: dict) -> str:
    return (f"| {r['batch']} | {r['pos']} | {r['step_ms']:.1f} | {r['matmul_ms']:.1f} ({r['matmul_gbps']:.1f} GB/s) | "
            f"{r['attention_ms']:.1f} ({r['attention_gbps']:.1f} GB/s) | {r['other_ms']:.1f} |")


HEADER = ("| batch | position | step ms | matmuls ms (weights GB/s) | attention ms (KV GB/s) | rest ms |\n"
          "|---|---|---|---|---|---|")


def greedy_prefix(model: IGPT, batch: int, n: int) -> torch.Tensor:
    """The first n greedy tokens after [SOS] through prefill + decode_one_token: (batch, n) int64."""
    cache = model.new_cache(batch)
    ids = torch.full((batch, 1), model.sos_id, dtype=torch.long, device=model.device)
    logits, out = model.prefill(ids, cache), []
    for p in range(n):
        out.append(logits.argmax(-1))
        if p + 1 < n:
            logits = model.decode_one_token(out[-1][:, None], p + 1, cache)
    return torch.stack(out, 1)


def precision_row(reference: IGPT, model: IGPT, batch: int, n_greedy: int, layer: int) -> dict:
    """A reduced-precision model against fp32: feature error, greedy agreement, extraction and sampling speed.

    Greedy agreement: the share of the first n_greedy greedy tokens equal to fp32's, and how many positions
    each sample runs before its first disagreement (after one, the two continue from different prefixes)."""
    device, P = model.device, model.n_positions
    tokens = torch.randint(0, model.vocab_size - 1, (batch, P), generator=torch.Generator().manual_seed(0)).to(device)
    ref_f, got_f = reference.features(tokens, [layer]), model.features(tokens, [layer])
    n_greedy = min(n_greedy, P)
    ref_g, got_g = greedy_prefix(reference, 2, n_greedy), greedy_prefix(model, 2, n_greedy)
    same = (ref_g == got_g).int()
    first_diff = torch.where(same.all(1), n_greedy, (1 - same).argmax(1))
    with torch.no_grad():
        extract_s = _best(lambda: model.features(tokens, [layer]), device, repeats=2)
    return {"dtype": str(model.dtype).replace("torch.", ""),
            "feature_rel_error": ((got_f - ref_f).norm() / ref_f.norm()).item(),
            "greedy_agreement": same.float().mean().item(), "greedy_first_diff": first_diff.tolist(),
            "extract_images_per_s": batch / extract_s}
