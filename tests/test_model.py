"""igpt_batch.model.transformer against transformers' own ImageGPTForCausalImageModeling on tiny random configs."""

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import full_logits, tiny_hf

from igpt_batch.model.loading import resolve_device
from igpt_batch.model.transformer import IGPT, KVCache, kv_cache_bytes

N_LAYER, N_EMBD, N_POS, VOCAB = 3, 32, 64, 17
SOS = VOCAB - 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clusters() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (VOCAB - 1, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


@pytest.fixture(scope="module")
def model(hf):
    return IGPT(hf, clusters())


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (batch, N_POS), generator=torch.Generator().manual_seed(seed))


def shifted(tok: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full_like(tok[:, :1], SOS), tok[:, :-1]], dim=1)


def hf_features(hf, tok: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        hs = hf(input_ids=shifted(tok), output_hidden_states=True).hidden_states
        h = hs[layer] if layer == hf.config.n_layer else hf.transformer.h[layer].ln_1(hs[layer])
    return h.mean(dim=1)


def test_attributes(model):
    assert (model.n_px, model.n_layer, model.n_embd) == (8, N_LAYER, N_EMBD)
    assert (model.vocab_size, model.sos_id) == (VOCAB, SOS)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.clusters.shape == (VOCAB - 1, 3) and model.clusters.dtype == np.float32
    # the HF module's parameters are used, not copies
    assert model.transformer.wte.weight.data_ptr() == model.hf.transformer.wte.weight.data_ptr()


def test_bad_clusters_and_non_square_positions(hf):
    with pytest.raises(ValueError, match="clusters"):
        IGPT(hf, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="square"):
        IGPT(tiny_hf(n_positions=60), clusters())


@pytest.mark.parametrize("inverse_layer_idx", [False, True])
def test_logits_match_hf(inverse_layer_idx):
    hf = tiny_hf(seed=3, scale_attn_by_inverse_layer_idx=inverse_layer_idx)
    model = IGPT(hf, clusters())
    ids = torch.cat([torch.full((4, 1), SOS), torch.randint(0, VOCAB - 1, (4, N_POS - 1))], dim=1)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    ours = full_logits(model, ids)
    assert ours.shape == (4, N_POS, VOCAB - 1) and ours.dtype == torch.float32
    assert ref.std() > 0.5  # non-trivial logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_features_match_hf_each_layer(hf, model):
    tok = tokens()
    for layer in range(N_LAYER + 1):
        ours = model.features(tok, [layer])
        assert ours.shape == (3, N_EMBD) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, hf_features(hf, tok, layer), atol=1e-5, rtol=0)


def test_features_concatenate_in_given_order(hf, model):
    tok = tokens(batch=2, seed=5)
    order = [N_LAYER, 1, 2]
    ours = model.features(tok, order)
    ref = torch.cat([hf_features(hf, tok, layer) for layer in order], dim=1)
    assert ours.shape == (2, len(order) * N_EMBD)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_features_accept_numpy_and_other_int_dtypes(model):
    tok = tokens(batch=2)
    ref = model.features(tok, [2])
    torch.testing.assert_close(model.features(tok.numpy().astype(np.int32), [2]), ref)


def test_features_do_not_run_deeper_blocks(hf, model):
    """Poison everything a layer-l feature must not touch with NaN: the result stays finite and equal."""
    tok = tokens(batch=2, seed=7)
    for layer in range(N_LAYER):
        poisoned = copy.deepcopy(hf)
        with torch.no_grad():
            poisoned.transformer.ln_f.weight.fill_(float("nan"))
            poisoned.lm_head.weight.fill_(float("nan"))
            for i, blk in enumerate(poisoned.transformer.h):
                for name, p in blk.named_parameters():
                    if i > layer or (i == layer and not name.startswith("ln_1")):
                        p.fill_(float("nan"))
        got = IGPT(poisoned, clusters()).features(tok, [layer])
        assert torch.isfinite(got).all(), layer
        torch.testing.assert_close(got, model.features(tok, [layer]), atol=0, rtol=0)


@pytest.mark.parametrize("bad", [[N_LAYER + 1], [-1], [], [1.5], [0, 99]])
def test_features_layer_validation(model, bad):
    with pytest.raises(ValueError, match="layer"):
        model.features(tokens(batch=1), bad)


def test_features_token_shape_validation(model):
    with pytest.raises(ValueError, match="tokens must have shape"):
        model.features(torch.zeros(2, N_POS - 1, dtype=torch.long), [1])


def test_bf16_features_close_to_fp32(hf, model):
    tok = tokens(batch=4, seed=11)
    model16 = IGPT(copy.deepcopy(hf).to(torch.bfloat16), clusters())
    assert model16.dtype == torch.bfloat16
    layers = [1, N_LAYER]
    ref, got = model.features(tok, layers), model16.features(tok, layers)
    assert got.dtype == torch.float32
    rel = (got - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_prefill_and_decode_match_full_logits(model):
    ids = shifted(tokens(batch=3, seed=13))
    full = full_logits(model, ids)  # (B, P, V-1)
    cache = model.new_cache(3)
    n_prefill = 5
    torch.testing.assert_close(model.prefill(ids[:, :n_prefill], cache), full[:, n_prefill - 1], atol=1e-4, rtol=0)
    for pos in range(n_prefill, N_POS):
        step = model.decode_one_token(ids[:, pos : pos + 1], pos, cache)
        assert step.shape == (3, VOCAB - 1) and step.dtype == torch.float32
        torch.testing.assert_close(step, full[:, pos], atol=1e-4, rtol=0)


def test_decode_from_position_zero_and_full_prefill(model):
    ids = shifted(tokens(batch=2, seed=17))
    full = full_logits(model, ids)
    cache = model.new_cache(2)
    for pos in range(N_POS):
        torch.testing.assert_close(model.decode_one_token(ids[:, pos : pos + 1], pos, cache), full[:, pos],
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(model.prefill(ids, model.new_cache(2)), full[:, -1], atol=1e-4, rtol=0)


def test_chunked_blocks_with_cache_match_full_forward(model):
    """block() with a cache and pos0 > 0, T > 1 (masked chunk attention) equals the cache-free forward."""
    ids = shifted(tokens(batch=2, seed=19))
    full = full_logits(model, ids)
    cache = model.new_cache(2)
    for start, end in [(0, 10), (10, 11), (11, 40), (40, N_POS)]:
        x = model.embed(ids[:, start:end], start)
        for i in range(model.n_layer):
            x = model.block(i, x, cache, start)
        torch.testing.assert_close(model.head(x), full[:, start:end], atol=1e-4, rtol=0)


def test_decode_position_validation(model):
    with pytest.raises(ValueError, match="pos"):
        model.decode_one_token(torch.zeros(1, 1, dtype=torch.long), N_POS, model.new_cache(1))


def test_kv_cache_size_and_layout(model):
    per_sample = kv_cache_bytes(model.config, torch.float32)
    assert per_sample == 2 * N_LAYER * N_POS * N_EMBD * 4 == 49152
    assert kv_cache_bytes(model.config, "bf16") == per_sample // 2
    cache = model.new_cache(5)
    assert isinstance(cache, KVCache) and cache.batch_size == 5
    assert cache.k.shape == (N_LAYER, 5, 4, N_POS, N_EMBD // 4)
    assert cache.k.dtype == model.dtype and cache.k.device == model.device
    assert cache.k.nbytes + cache.v.nbytes == 5 * per_sample


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ["tpu", "", "cuda:x", "cuda:-1", "gpu0"]:
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for spec in ["cuda", "cuda:1"]:
            with pytest.raises(ValueError, match="CUDA is not available"):
                resolve_device(spec)


def _check_decode(model, seed):
    ids = shifted(tokens(batch=2, seed=seed))
    full = full_logits(model, ids)
    cache = model.new_cache(2)
    torch.testing.assert_close(model.prefill(ids[:, :3], cache), full[:, 2], atol=1e-4, rtol=0)
    for pos in range(3, 8):
        torch.testing.assert_close(model.decode_one_token(ids[:, pos : pos + 1], pos, cache), full[:, pos],
                                   atol=1e-4, rtol=0)


def test_compile_decode_stays_eager_off_cuda(hf, caplog):
    model = IGPT(hf, clusters())
    with caplog.at_level(logging.WARNING, logger="igpt_batch.model.transformer"):
        assert model.compile_decode() is (model.device.type == "cuda")
    assert "stays eager" in caplog.text
    _check_decode(model, 23)


def test_compile_decode_falls_back_when_compilation_fails(hf, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("forced compiler failure")

    model = IGPT(hf, clusters())
    with caplog.at_level(logging.WARNING, logger="igpt_batch.model.transformer"):
        assert model.compile_decode(backend=broken_backend, mode=None, require_cuda=False)
        _check_decode(model, 29)  # first compiled call fails -> warning -> eager result
    assert "falling back to eager" in caplog.text
    assert model._compiled_decode is None


def test_compiled_static_decode_path_matches(hf):
    """The fixed-shape decode (tensor position, whole-cache masked attention) traced by dynamo."""
    model = IGPT(hf, clusters())
    assert model.compile_decode(backend="eager", mode=None, require_cuda=False)
    _check_decode(model, 31)
    assert model._compiled_decode is not None


def test_load_model_from_local_safetensors_folder(tmp_path, hf, model):
    import json

    from igpt_batch.model.loading import load_model

    hf.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters().tolist()}))
    loaded = load_model(str(tmp_path), dtype="fp32", device="cpu")
    assert loaded.dtype == torch.float32 and not loaded.hf.training
    assert not any(p.requires_grad for p in loaded.hf.parameters())
    np.testing.assert_array_equal(loaded.clusters, clusters())
    tok = tokens(batch=2, seed=37)
    torch.testing.assert_close(loaded.features(tok, [2]), model.features(tok, [2]), atol=1e-6, rtol=0)
    assert load_model(str(tmp_path), dtype="bf16", device="cpu").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path), dtype="fp8", device="cpu")


def test_compiled_generation_reuses_its_cache_and_matches_eager(hf):
    """Repeated generate calls on the compiled path reuse one cache per batch size (fixed addresses for CUDA
    graphs); stale entries from the previous call must not leak into the next."""
    from igpt_batch.model.sampling import generate

    eager = IGPT(hf, clusters())
    compiled = IGPT(hf, clusters())
    assert compiled.compile_decode(backend="eager", mode=None, require_cuda=False, buckets=2)
    first = generate(compiled, [1, 2, 3], temperature=1.0)
    assert compiled.new_cache(3) is compiled.new_cache(3)
    second = generate(compiled, [4, 5, 6], temperature=1.0)  # runs over the cache the first call filled
    np.testing.assert_array_equal(first, generate(eager, [1, 2, 3], temperature=1.0))
    np.testing.assert_array_equal(second, generate(eager, [4, 5, 6], temperature=1.0))


# ----------------------------------------------------------------- length-bucketed compiled decode
def test_bucket_end_rounds_up_to_bucket_boundaries(hf):
    model = IGPT(hf, clusters())
    assert model.bucket_end(0) == N_POS  # not compiled: one bucket, the whole cache
    assert model.compile_decode(backend="eager", mode=None, require_cuda=False, buckets=4)
    assert [model.bucket_end(p) for p in (0, 14, 15, 16, 47, 48, N_POS - 1)] == [16, 16, 16, 32, 48, 64, 64]
    with pytest.raises(ValueError, match="buckets"):
        model.compile_decode(backend="eager", mode=None, require_cuda=False, buckets=0)


def test_bucketed_compiled_decode_equals_unbucketed_step():
    """Every position, across all bucket boundaries: one graph per bucket, logits equal to the whole-cache
    compiled step and to the cache-free forward within fp32 tolerance."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # count this test's graphs only
    hf, n_pos = tiny_hf(seed=41, n_positions=16, n_layer=2), 16
    ids = shifted(torch.randint(0, VOCAB - 1, (2, n_pos), generator=torch.Generator().manual_seed(41)))
    full = full_logits(IGPT(hf, clusters()), ids)
    steps = {}
    for buckets in (4, 1):
        model = IGPT(hf, clusters())
        assert model.compile_decode(backend=counting_backend, mode=None, require_cuda=False, buckets=buckets)
        cache = model.new_cache(2)
        model.prefill(ids[:, :1], cache)
        steps[buckets] = torch.stack([model.decode_one_token(ids[:, p : p + 1], p, cache) for p in range(1, n_pos)], 1)
        assert model._compiled_decode is not None
        if buckets == 4:
            assert len(graphs) == 4  # one graph per bucket (the last, over the whole cache, serves buckets=1 too)
    torch.testing.assert_close(steps[4], steps[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps[4], full[:, 1:], atol=1e-4, rtol=0)


# ----------------------------------------------------------------- reduced precision
def loud_hf(value: float = 1500.0):
    """A checkpoint whose residual stream carries a value above 1,000 at every position (GPT-2-family
    residual streams do carry outliers): in fp16, mean(x^2) of such a row overflows."""
    hf = tiny_hf(seed=5)
    with torch.no_grad():
        hf.transformer.wpe.weight[:, 3] += value
    return hf


def test_rms_norm_statistics_in_fp32_for_reduced_precision():
    from igpt_batch.model.transformer import rms_norm

    ln = torch.nn.LayerNorm(8)  # only .weight and .eps are read
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 8)
    x[:, 2] = 300.0  # 300^2 * 8 overflows fp16's 65,504
    ref = rms_norm(x, ln)
    for dtype in (torch.float16, torch.bfloat16):
        got = rms_norm(x.to(dtype), type("LN", (), {"weight": ln.weight.to(dtype), "eps": ln.eps})())
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref, atol=0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_with_a_loud_residual_stream(dtype):
    """Features finite and within 2e-2 relative of fp32; samples are valid tokens."""
    from igpt_batch.model.sampling import generate

    hf = loud_hf()
    ref_model = IGPT(hf, clusters())
    tok = tokens(batch=3, seed=43)
    with torch.no_grad():
        hidden = hf(input_ids=shifted(tok), output_hidden_states=True).hidden_states
    assert max(h.abs().max().item() for h in hidden) > 1000
    low = IGPT(copy.deepcopy(hf).to(dtype), clusters())
    layers = [1, N_LAYER]
    ref, got = ref_model.features(tok, layers), low.features(tok, layers)
    assert torch.isfinite(got).all()
    for j in range(len(layers)):  # each layer's block on its own, so the loud channel cannot hide the rest
        part = slice(j * N_EMBD, (j + 1) * N_EMBD)
        assert ((got[:, part] - ref[:, part]).norm() / ref[:, part].norm()).item() < 2e-2
    out = generate(low, [1, 2], temperature=1.0)
    assert out.shape == (2, N_POS) and ((out >= 0) & (out < VOCAB - 1)).all()


def test_bf16_model_keeps_a_bf16_kv_cache(hf):
    model16 = IGPT(copy.deepcopy(hf).to(torch.bfloat16), clusters())
    cache = model16.new_cache(3)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert cache.k.nbytes + cache.v.nbytes == 3 * kv_cache_bytes(model16.config, model16.dtype)
    assert kv_cache_bytes(model16.config, model16.dtype) == kv_cache_bytes(hf.config, torch.float32) // 2
