"""igpt_batch.model.sampling: greedy equals transformers' generate; counter-based randomness; filters."""

import numpy as np
import pytest
import torch
from conftest import full_logits, tiny_hf
from scipy.stats import chisquare

from igpt_batch.model.sampling import (
    filter_logits,
    generate,
    gumbel_noise,
    sample_next,
    seeds_tensor,
    validate_sampling,
)
from igpt_batch.model.transformer import IGPT

N_POS, VOCAB = 64, 17
K = VOCAB - 1  # colours; SOS = K


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


@pytest.fixture(scope="module")
def model(hf):
    return IGPT(hf, np.random.default_rng(0).uniform(-1, 1, (K, 3)).astype(np.float32))


def hf_greedy(hf, prefix: torch.Tensor, n_new: int) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=n_new,
                          do_sample=False, pad_token_id=0)
    return out[:, 1:].numpy()  # strip SOS


def test_greedy_equals_hf_generate(hf, model):
    ours = generate(model, seeds=[0, 1, 2], temperature=0)
    assert ours.shape == (3, N_POS) and ours.dtype == np.int64
    ref = hf_greedy(hf, torch.full((3, 1), K), N_POS)
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ours[0])) > 2  # a non-degenerate image


def test_greedy_prompt_completion_equals_hf_generate(hf, model):
    rows = 20
    prompt = np.random.default_rng(3).integers(0, K, (2, rows))
    ours = generate(model, seeds=[5, 6], temperature=0, prompt=prompt)
    prefix = torch.cat([torch.full((2, 1), K), torch.as_tensor(prompt)], dim=1)
    np.testing.assert_array_equal(ours, hf_greedy(hf, prefix, N_POS - rows))


@pytest.mark.parametrize("rows", [0, 1, 37, N_POS - 1, N_POS])
def test_prompt_completion_keeps_prompt(model, rows):
    prompt = np.random.default_rng(rows).integers(0, K, (3, rows))
    seeds = [11, 12, 13]
    out = generate(model, seeds, temperature=1.0, top_k=5, prompt=prompt)
    assert out.shape == (3, N_POS)
    np.testing.assert_array_equal(out[:, :rows], prompt)
    assert ((out >= 0) & (out < K)).all()
    if rows == 0:
        np.testing.assert_array_equal(out, generate(model, seeds, temperature=1.0, top_k=5))


def test_prompt_validation(model):
    with pytest.raises(ValueError, match="prompt must have shape"):
        generate(model, [1, 2], prompt=np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="prompt tokens"):
        generate(model, [1], prompt=np.full((1, 4), K))


SEEDS = [0, 1, 7, 42, 2**32 + 1, 2**40 + 3, 2**63 + 5, 2**64 - 1]


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9)])
def test_same_seeds_same_tokens_for_any_batching(model, options):
    full = generate(model, SEEDS, **options)  # batch 8
    singles = np.concatenate([generate(model, [s], **options) for s in SEEDS])  # batch 1
    threes = np.concatenate([generate(model, SEEDS[i : i + 3], **options) for i in range(0, 8, 3)])  # 3, 3, 2
    np.testing.assert_array_equal(full, singles)
    np.testing.assert_array_equal(full, threes)
    shuffled = [SEEDS[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    np.testing.assert_array_equal(generate(model, shuffled, **options), full[[5, 2, 7, 0, 3, 6, 1, 4]])
    assert len({row.tobytes() for row in full}) == len(SEEDS)  # different seeds, different images


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value, with bins of expected count < 5 merged into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_first_token_distribution_chi_square(model):
    temperature, n = 0.8, 4000
    sos_logits = full_logits(model, torch.tensor([[K]]))[0, 0].double()
    probs = torch.softmax(sos_logits / temperature, dim=-1).numpy()
    assert probs.max() < 0.6 and (probs * n >= 5).sum() >= 6  # a distribution worth testing
    first = generate(model, range(10_000, 10_000 + n), temperature=temperature)[:, 0]
    counts = np.bincount(first, minlength=K)
    assert _chi_square(counts, probs) > 1e-3


@pytest.mark.parametrize("position", [1, 37, 2**20 + 3])
def test_noise_distribution_at_other_positions(position):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 1.5])
    n = 5000
    seeds = seeds_tensor(range(n), "cpu")
    tok = sample_next(logits.expand(n, -1), seeds, position, 1.0, 0, 1.0)
    assert _chi_square(np.bincount(tok.numpy(), minlength=8), torch.softmax(logits.double(), 0).numpy()) > 1e-3


def test_gumbel_noise_is_a_pure_function():
    seeds = seeds_tensor([3, 2**32 + 3, 2**63 + 3, 2**64 - 1], "cpu")
    g = gumbel_noise(seeds, 5, 513)
    assert g.shape == (4, 513) and g.dtype == torch.float32 and torch.isfinite(g).all()
    torch.testing.assert_close(g, gumbel_noise(seeds, 5, 513), atol=0, rtol=0)
    torch.testing.assert_close(g[2:3], gumbel_noise(seeds[2:3], 5, 513), atol=0, rtol=0)  # batch-independent
    torch.testing.assert_close(g[:, :17], gumbel_noise(seeds, 5, 17), atol=0, rtol=0)  # vocab-prefix stable
    assert not torch.equal(g[0], g[1])  # seeds differing only in the high 32 bits
    assert not torch.equal(g, gumbel_noise(seeds, 6, 513))
    big = gumbel_noise(seeds_tensor(range(200), "cpu"), 0, 513)
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.var().item() - np.pi**2 / 6) < 0.05
    with pytest.raises(ValueError, match="seeds"):
        seeds_tensor([-1], "cpu")


def _top_k_sets(logits: np.ndarray, k: int) -> list[set]:
    return [set(np.argsort(-row)[:k]) for row in logits]


def _nucleus_sets(logits: np.ndarray, p: float) -> list[set]:
    sets = []
    for row in logits:
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix with mass >= p
        sets.append(set(order[:size]))
    return sets


@pytest.fixture(scope="module")
def fixed_logits():
    return torch.randn(32, K, generator=torch.Generator().manual_seed(0)) * 2


def _draws(logits, **opts):
    """All draws over 64 seeds and 40 positions for each row: list of sets of emitted tokens per row."""
    emitted = [set() for _ in range(logits.shape[0])]
    for seed0 in range(0, 64, 8):
        for position in range(40):
            seeds = seeds_tensor([seed0 * 1000 + r for r in range(logits.shape[0])], "cpu")
            tok = sample_next(logits, seeds, position, **opts)
            for r, t in enumerate(tok.tolist()):
                emitted[r].add(t)
    return emitted


def test_top_k_never_outside_top_k(fixed_logits):
    allowed = _top_k_sets(fixed_logits.numpy(), 3)
    emitted = _draws(fixed_logits, temperature=1.5, top_k=3, top_p=1.0)
    assert all(e <= a for e, a in zip(emitted, allowed))
    assert sum(len(e) == 3 for e in emitted) > 16  # the whole top-k set is actually used


def test_top_p_never_outside_nucleus(fixed_logits):
    temperature, p = 1.3, 0.7
    allowed = _nucleus_sets((fixed_logits / temperature).numpy(), p)
    emitted = _draws(fixed_logits, temperature=temperature, top_k=0, top_p=p)
    assert all(e <= a for e, a in zip(emitted, allowed))
    assert all(e == a for e, a in zip(emitted, allowed) if len(a) <= 3)


def test_top_k_and_top_p_together(fixed_logits):
    """top-p is taken over the top-k renormalised distribution (the HF warper order)."""
    logits = fixed_logits.numpy()
    top4 = _top_k_sets(logits, 4)
    masked = np.where([[t in s for t in range(K)] for s in top4], logits, -np.inf)
    allowed = _nucleus_sets(masked, 0.5)
    emitted = _draws(fixed_logits, temperature=1.0, top_k=4, top_p=0.5)
    assert all(e <= a <= s for e, a, s in zip(emitted, allowed, top4))
    assert all(e == a for e, a in zip(emitted, allowed) if len(a) <= 2)


def test_filter_logits_keeps_argmax_and_masks(fixed_logits):
    out = filter_logits(fixed_logits, 1, 1.0)
    assert (torch.isfinite(out).sum(-1) == 1).all()
    assert torch.equal(out.argmax(-1), fixed_logits.argmax(-1))
    tiny_p = filter_logits(fixed_logits, 0, 1e-6)
    assert (torch.isfinite(tiny_p).sum(-1) == 1).all()
    torch.testing.assert_close(filter_logits(fixed_logits, 0, 1.0), fixed_logits)
    torch.testing.assert_close(filter_logits(fixed_logits, K, 1.0), fixed_logits)


def test_greedy_sample_next_is_argmax(fixed_logits):
    seeds = seeds_tensor(range(32), "cpu")
    assert torch.equal(sample_next(fixed_logits, seeds, 3, 0.0, 5, 0.5), fixed_logits.argmax(-1))


def test_validate_sampling():
    assert validate_sampling(1.0, 0, 1.0, 16) == (1.0, 0, 1.0)
    assert validate_sampling(0, 100, 0.9, 16) == (0.0, 16, 0.9)  # top_k clamped to vocab
    assert validate_sampling(0.7, 5, 1, 16) == (0.7, 5, 1.0)
    for kwargs, msg in [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=float("nan")), "top_p"),
    ]:
        args = dict(temperature=1.0, top_k=0, top_p=1.0) | kwargs
        with pytest.raises(ValueError, match=msg):
            validate_sampling(args["temperature"], args["top_k"], args["top_p"], 16)


def test_generate_validates_options(model):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], top_p=2.0)
    assert generate(model, [1], top_k=10_000).shape == (1, N_POS)  # clamped, not an error
    assert generate(model, []).shape == (0, N_POS)


def _bucketed(hf, buckets: int) -> IGPT:
    """The compiled decode path on CPU (dynamo with the eager backend), attending over length buckets."""
    model = IGPT(hf, np.random.default_rng(0).uniform(-1, 1, (K, 3)).astype(np.float32))
    assert model.compile_decode(backend="eager", mode=None, require_cuda=False, buckets=buckets)
    return model


def test_bucketed_compiled_greedy_equals_hf_generate(hf):
    model = _bucketed(hf, buckets=4)
    ours = generate(model, seeds=[0, 1], temperature=0)
    assert model._compiled_decode is not None  # no fallback to eager happened
    np.testing.assert_array_equal(ours, hf_greedy(hf, torch.full((2, 1), K), N_POS))


def test_seeded_samples_identical_across_bucket_settings(hf, model):
    seeds, options = [3, 2**40 + 1, 2**64 - 2], dict(temperature=0.9, top_k=8)
    eager = generate(model, seeds, **options)
    for buckets in (1, 2, 4):  # bucket ends 64 / 32, 64 / 16, 32, 48, 64: the graphs the greedy test traced
        compiled = _bucketed(hf, buckets)
        np.testing.assert_array_equal(generate(compiled, seeds, **options), eager, err_msg=f"buckets={buckets}")
        assert compiled._compiled_decode is not None
