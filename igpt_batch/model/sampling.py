"""Counter-based sampling: a sample's tokens depend only on (model, seed, sampling options).

The randomness for token ``t`` at image position ``p`` of the sample with seed ``s`` is a Gumbel variate
computed from an integer hash of (s, p, t) with torch integer ops on the model's device, so results do
not depend on batch composition, batch size, worker or resume. Sampling is Gumbel-max:
argmax(filtered(logits / temperature) + gumbel) draws from softmax(filtered(logits / temperature)).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from igpt_batch.model.transformer import IGPT

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^27: a product with a 32-bit value stays below 2^59, no int64 overflow
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 values kept in [0, 2^32) (right shifts are then logical)."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def _combine(h: torch.Tensor, value) -> torch.Tensor:
    return _mix32(((h ^ value) + _GOLDEN) & _M32)


def seeds_tensor(seeds: Sequence[int], device) -> torch.Tensor:
    """Python ints in [0, 2^64) -> int64 tensor holding the same 64 bits (two's complement)."""
    values = [int(s) for s in seeds]
    for s in values:
        if not 0 <= s < 2**64:
            raise ValueError(f"seeds must be integers in [0, 2**64), got {s}")
    return torch.tensor([s - 2**64 if s >= 2**63 else s for s in values], dtype=torch.int64, device=device)


def gumbel_noise(seeds: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, vocab) float32 standard Gumbel noise, a pure function of (seed, position, token)."""
    lo = seeds & _M32  # low 32 bits (also right for negative int64)
    hi = (seeds >> 32) & _M32  # high 32 bits (mask undoes the arithmetic shift's sign fill)
    h = _combine(_combine(_combine(torch.zeros_like(seeds), lo), hi), position & _M32)  # (B,)
    tokens = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    h = _mix32(_combine(h[:, None], tokens[None, :]))  # (B, V) in [0, 2^32)
    # 23 bits -> (k + 0.5) / 2^23 is exact in float32 and strictly inside (0, 1)
    u = ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def validate_sampling(temperature: float, top_k: int, top_p: float, vocab: int) -> tuple[float, int, float]:
    """temperature >= 0 (0 = greedy); top_k >= 0 (0 = off, > vocab clamped); 0 < top_p <= 1 (1 = off)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return float(temperature), min(int(top_k), vocab), float(top_p)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """-inf outside the top_k set, then outside the smallest nucleus with probability >= top_p."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False  # always keep the argmax
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, seeds: torch.Tensor, position: int, temperature: float,
                top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V) -> tokens (B,) int64. temperature 0 is exact greedy argmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    return (filtered + gumbel_noise(seeds, position, logits.shape[-1])).argmax(dim=-1)


@torch.no_grad()
def generate(model: "IGPT", seeds: Sequence[int], temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, prompt: np.ndarray | None = None) -> np.ndarray:
    """Sample images (B, n_px*n_px) int64 on CPU; optional prompt (B, R) keeps its first R tokens."""
    vocab = model.vocab_size - 1
    temperature, top_k, top_p = validate_sampling(temperature, top_k, top_p, vocab)
    device, n_tokens = model.device, model.n_px * model.n_px
    seeds_t = seeds_tensor(seeds, device)  # (B,)
    batch = seeds_t.shape[0]
    prompt_t = _check_prompt(prompt, batch, n_tokens, vocab, device)  # (B, R)
    rows = prompt_t.shape[1]
    out = torch.empty((batch, n_tokens), dtype=torch.int64, device=device)
    out[:, :rows] = prompt_t
    if rows == n_tokens or batch == 0:
        return out.cpu().numpy()
    cache = model.new_cache(batch)
    sos = torch.full((batch, 1), model.sos_id, dtype=torch.int64, device=device)
    logits = model.prefill(torch.cat([sos, prompt_t], dim=1), cache)  # predicts image position `rows`
    for p in range(rows, n_tokens):
        out[:, p] = sample_next(logits, seeds_t, p, temperature, top_k, top_p)
        if p + 1 < n_tokens:  # image token p sits at sequence position p + 1 (after SOS)
            logits = model.decode_one_token(out[:, p : p + 1], p + 1, cache)
    return out.cpu().numpy()


def _check_prompt(prompt, batch: int, n_tokens: int, vocab: int, device) -> torch.Tensor:
    if prompt is None:
        return torch.empty((batch, 0), dtype=torch.int64, device=device)
    arr = np.asarray(prompt)
    if arr.ndim != 2 or arr.shape[0] != batch or arr.shape[1] > n_tokens:
        raise ValueError(f"prompt must have shape ({batch}, R) with R <= {n_tokens}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompt must hold integer tokens, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise ValueError(f"prompt tokens must be in [0, {vocab}), got range [{arr.min()}, {arr.max()}]")
    return torch.as_tensor(arr.astype(np.int64), device=device)
