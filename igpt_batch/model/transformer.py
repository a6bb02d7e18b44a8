"""The one ImageGPT transformer forward of the project (extraction and sampling both use it)."""

# It runs over the weights of a transformers ImageGPTForCausalImageModeling (its parameters, never a copy) with
# scaled_dot_product_attention and a preallocated static KV cache updated in place. Numerics follow transformers'
# eager ImageGPT: RMS-style layer norm without mean subtraction or bias (statistics in fp32), Conv1D weights (in, out)
# (re-stored row-major in place, so F.linear reads them row by row),
# attention scale 1/sqrt(head_dim) (optionally also 1/(layer+1)).

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kv_cache_bytes(config, dtype) -> int:
    """Exact per-sample KV cache size: 2 (k, v) * n_layer * n_positions * n_embd * bytes_per_element."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * config.n_positions * config.n_embd * elem


@dataclass
class KVCache:
    """Preallocated keys/values, each (n_layer, B, n_head, n_positions, head_dim); updated in place."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def rms_norm(x: torch.Tensor, ln) -> torch.Tensor:
    """ImageGPTLayerNorm: x / sqrt(mean(x^2) + eps) * weight (no centring, no bias), with the statistics in
    fp32 whatever x's dtype: in fp16 one residual value above 256 overflows mean(x^2) and zeroes the row."""
    if x.dtype == torch.float32:  # exactly transformers' formula
        return x / torch.sqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + ln.eps) * ln.weight
    x32 = x.float()
    scale = torch.rsqrt(torch.mean(torch.square(x32), dim=-1, keepdim=True) + ln.eps)  # (..., 1) f32
    return (x32 * scale * ln.weight.float()).to(x.dtype)


def conv1d(x: torch.Tensor, mod) -> torch.Tensor:
    """transformers Conv1D: x @ weight + bias, weight (in, out) (stored row-major (out, in) by row_major_conv1d)."""
    return F.linear(x, mod.weight.t(), mod.bias)


def row_major_conv1d(mod) -> None:
    """Re-store a Conv1D weight (in, out) as the transpose of a contiguous (out, in) tensor, in place: the same
    parameter, values and shape for transformers, but F.linear then reads it row by row, which makes a CPU decode
    step's matmuls faster, bf16 most of all (figures: docs/BENCHMARKS.md)."""
    if not mod.weight.t().is_contiguous():
        mod.weight.data = mod.weight.data.t().contiguous().t()


class IGPT(torch.nn.Module):
    """Own forward over a (possibly random-init) HF ImageGPTForCausalImageModeling's parameters."""

    def __init__(self, hf_model, clusters: np.ndarray):
        super().__init__()
        self.hf = hf_model.eval().requires_grad_(False)
        cfg = self.config = hf_model.config
        self.n_layer, self.n_embd, self.n_head = cfg.n_layer, cfg.n_embd, cfg.n_head
        self.head_dim = self.n_embd // self.n_head
        self.n_positions = cfg.n_positions
        self.n_px = math.isqrt(self.n_positions)
        if self.n_px * self.n_px != self.n_positions:
            raise ValueError(f"n_positions must be a square (n_px*n_px), got {self.n_positions}")
        self.vocab_size = cfg.vocab_size
        self.sos_id = cfg.vocab_size - 1
        clusters = np.asarray(clusters, dtype=np.float32)
        if clusters.shape != (self.vocab_size - 1, 3):
            raise ValueError(f"clusters must have shape ({self.vocab_size - 1}, 3), got {clusters.shape}")
        self.clusters = clusters
        self.act = ACT2FN[cfg.activation_function]
        for blk in hf_model.transformer.h:
            for mod in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
                row_major_conv1d(mod)
        inv_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))
        base = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        self.attn_scales = [base / (i + 1 if inv_layer else 1) for i in range(self.n_layer)]
        wte = hf_model.transformer.wte.weight
        self.register_buffer("positions", torch.arange(self.n_positions, device=wte.device), persistent=False)
        self._compiled_decode = None
        self.decode_buckets = 1  # compiled decode: attended-length buckets (set by compile_decode)
        self._static_caches: dict[int, KVCache] = {}  # compiled decode only: batch size -> reused cache

    @property
    def transformer(self):
        """The HF ImageGPTModel whose parameters this forward runs over (wte, wpe, h[i], ln_f)."""
        return self.hf.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    # ----------------------------------------------------------------- building blocks
    def embed(self, ids: torch.Tensor, pos0: int | torch.Tensor = 0) -> torch.Tensor:
        """wte + wpe; ids (B, T) at positions pos0..pos0+T-1 (pos0 may be a (1,) device tensor)."""
        pos = pos0 if torch.is_tensor(pos0) else self.positions[pos0 : pos0 + ids.shape[1]]
        return self.transformer.wte(ids) + self.transformer.wpe(pos)  # (B, T, C)

    def attention(self, i: int, x: torch.Tensor, cache: KVCache | None, pos0) -> torch.Tensor:
        """Causal self-attention of block i on normalised x (B, T, C)."""
        B, T, C = x.shape
        attn, scale = self.transformer.h[i].attn, self.attn_scales[i]
        qkv = conv1d(x, attn.c_attn).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale)
        elif torch.is_tensor(pos0):  # static shapes (compiled decode): T == 1, attend over the cache's window
            cache.k[i].index_copy_(2, pos0, k)  # cache: views (.., W, hs) of the static cache, W a bucket end
            cache.v[i].index_copy_(2, pos0, v)
            mask = (self.positions[: cache.k.shape[3]] <= pos0).view(1, 1, 1, -1)  # (1, 1, 1, W)
            y = F.scaled_dot_product_attention(q, cache.k[i], cache.v[i], attn_mask=mask, scale=scale)
        else:
            end = pos0 + T
            cache.k[i, :, :, pos0:end] = k
            cache.v[i, :, :, pos0:end] = v
            keys, values = cache.k[i, :, :, :end], cache.v[i, :, :, :end]  # (B, nh, end, hs) views
            if T == 1:
                y = F.scaled_dot_product_attention(q, keys, values, scale=scale)
            elif pos0 == 0:
                y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale)
            else:  # query t (absolute pos0+t) sees keys 0..pos0+t
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(pos0)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return conv1d(y, attn.c_proj)

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m = self.transformer.h[i].mlp
        return conv1d(self.act(conv1d(x, m.c_fc)), m.c_proj)

    def block(self, i: int, x: torch.Tensor, cache: KVCache | None = None, pos0=0) -> torch.Tensor:
        """x + attn(ln_1 x); x + mlp(ln_2 x). With a cache, k/v are written at pos0..pos0+T-1."""
        h = self.transformer.h[i]
        x = x + self.attention(i, rms_norm(x, h.ln_1), cache, pos0)
        return x + self.mlp(i, rms_norm(x, h.ln_2))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """ln_f + lm_head -> float32 logits over the vocab_size-1 colours (no SOS)."""
        return F.linear(rms_norm(x, self.transformer.ln_f), self.hf.lm_head.weight).float()

    def _run(self, ids: torch.Tensor, cache: KVCache | None, pos0) -> torch.Tensor:
        x = self.embed(ids, pos0)
        for i in range(self.n_layer):
            x = self.block(i, x, cache, pos0)
        return x

    # ----------------------------------------------------------------- features (paper section 2.4)
    def _check_layers(self, layers) -> list[int]:
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one layer")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                raise ValueError(f"layers must be integers in [0, {self.n_layer}], got {layer!r}")
            if not 0 <= layer <= self.n_layer:
                raise ValueError(f"layer {layer} out of range: layers must be in [0, {self.n_layer}]")
        return [int(layer) for layer in layers]

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Mean over all positions of block l's ln_1(input) (ln_f output for l == n_layer), on the
        shifted input [SOS] + tokens[:-1]. Runs only blocks 0..max(layers)-1. -> (B, len(layers)*C) f32."""
        return self.features_and_scores(tokens, layers, score=False)[0]

    @torch.no_grad()
    def features_and_scores(self, tokens: torch.Tensor, layers: list[int], score: bool = True):
        """One pass: (features as in `features`, or None without layers; nll_bits (B,) f64 or None).
        With score the pass runs to full depth, pooling the features at their layers on the way, and ends in
        the head: nll_bits is the mean over the n_px^2 tokens of -log2 p(token_t | SOS, tokens_<t)."""
        layers = self._check_layers(layers) if (layers or not score) else []
        tokens = torch.as_tensor(tokens).to(self.device, torch.long)
        if tokens.ndim != 2 or tokens.shape[1] != self.n_positions:
            raise ValueError(f"tokens must have shape (B, {self.n_positions}), got {tuple(tokens.shape)}")
        sos = torch.full_like(tokens[:, :1], self.sos_id)
        x = self.embed(torch.cat([sos, tokens[:, :-1]], dim=1))  # (B, P, C)
        pooled: dict[int, torch.Tensor] = {}
        deepest = self.n_layer if score else max(layers)
        for i in range(deepest + 1):
            if i in layers:
                ln = self.transformer.ln_f if i == self.n_layer else self.transformer.h[i].ln_1
                pooled[i] = rms_norm(x, ln).mean(dim=1, dtype=torch.float32)  # (B, C)
            if i < deepest:
                x = self.block(i, x)
        feats = torch.cat([pooled[layer] for layer in layers], dim=1) if layers else None
        return feats, (self.nll_bits(x, tokens) if score else None)

    def nll_bits(self, x: torch.Tensor, tokens: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Last block's output x (B, P, C) and the tokens it predicts (B, P) -> (B,) f64 mean -log2 p(token).
        The head runs `chunk` images at a time, so its (chunk, P, V-1) f32 logits stay small beside the pass."""
        out = []
        for s in range(0, x.shape[0], chunk):
            logp = torch.log_softmax(self.head(x[s:s + chunk]), dim=-1)  # (b, P, V-1) f32
            out.append(logp.gather(-1, tokens[s:s + chunk, :, None]).squeeze(-1).double().sum(dim=1))
        return -torch.cat(out) / (self.n_positions * math.log(2))

    # ----------------------------------------------------------------- sampling primitives
    def new_cache(self, batch_size: int) -> KVCache:
        """A preallocated cache. With the compiled decode, one cache per batch size is kept and reused: CUDA
        graphs replay against fixed addresses, and a fresh cache per call would re-record (stale entries
        beyond the current position are masked out, and prefill overwrites the rest)."""
        if self._compiled_decode is not None and batch_size in self._static_caches:
            return self._static_caches[batch_size]
        shape = (self.n_layer, batch_size, self.n_head, self.n_positions, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self._compiled_decode is not None:  # CUDA graphs need the cache at a fixed address
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
            self._static_caches[batch_size] = KVCache(k, v)
        return KVCache(k, v)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (B, T) at positions 0..T-1: fill the cache, return f32 logits (B, V-1) of the last position."""
        if not 1 <= ids.shape[1] <= self.n_positions:
            raise ValueError(f"prefill length must be in [1, {self.n_positions}], got {ids.shape[1]}")
        return self.head(self._run(ids, cache, 0)[:, -1])

    def bucket_end(self, pos: int) -> int:
        """Positions the compiled step at `pos` attends over: pos + 1 rounded up to a bucket boundary
        (buckets n_positions / decode_buckets wide), so short prefixes skip the cache's unwritten tail."""
        width = -(-self.n_positions // self.decode_buckets)
        return min(self.n_positions, -(-(pos + 1) // width) * width)

    @torch.no_grad()
    def decode_one_token(self, ids: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """ids (B, 1) at position pos (cache holds 0..pos-1): return f32 logits (B, V-1)."""
        if not 0 <= pos < self.n_positions:
            raise ValueError(f"pos must be in [0, {self.n_positions}), got {pos}")
        if self._compiled_decode is not None:
            try:
                torch.compiler.cudagraph_mark_step_begin()
                return self._compiled_decode(ids, self.positions[pos : pos + 1], cache, self.bucket_end(pos))
            except Exception as exc:  # noqa: BLE001 - any compiler failure -> eager
                log.warning("compiled decode failed (%s: %s); falling back to eager", type(exc).__name__, exc)
                self._compiled_decode = None
        return self.head(self._run(ids, cache, pos)[:, -1])

    def _decode_static(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, end: int) -> torch.Tensor:
        """Fixed-shape decode step (pos a (1,) device tensor) attending over cache positions [0, end): one
        graph per bucket end, each over views of the same static cache (fixed addresses for CUDA graphs)."""
        window = KVCache(cache.k[:, :, :, :end], cache.v[:, :, :, :end])  # (L, B, nh, end, hs) views
        return self.head(self._run(ids, window, pos)[:, -1])

    def compile_decode(self, backend: str = "inductor", mode: str | None = "reduce-overhead",
                       require_cuda: bool = True, buckets: int = 8) -> bool:
        """Use torch.compile for decode_one_token (CUDA by default), one graph per attended-length bucket
        (`buckets` of them; 1 attends over the whole cache at every step). On any failure, now or at the
        first call, log a warning and stay eager. Returns whether the compiled path is active."""
        if not 1 <= buckets <= self.n_positions:
            raise ValueError(f"decode buckets must be in [1, {self.n_positions}], got {buckets}")
        if require_cuda and self.device.type != "cuda":
            log.warning("compile_decode: device is %s, not CUDA; decoding stays eager", self.device)
            return False
        self.decode_buckets = buckets
        try:
            kwargs = {"mode": mode} if mode else {}
            # one graph per (bucket, batch size), all guarded on the one code object of _decode_static
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * buckets)
            self._compiled_decode = torch.compile(self._decode_static, backend=backend, fullgraph=True,
                                                  dynamic=False, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("torch.compile unavailable (%s: %s); decoding stays eager", type(exc).__name__, exc)
            self._compiled_decode = None
        return self._compiled_decode is not None
