"""tinyserve.sampling against Hugging Face transformers' logits processors, plus its own contracts.

transformers (torch CPU, float32, shape (1, V)) is the reference for every step and for the whole chain:
same set of kept tokens and the same probabilities to ~1e-6. The one allowed difference is documented in
tinyserve/sampling.py: when several tokens are tied exactly at the top-p boundary, which of them survive is
decided by torch.sort's (arbitrary) order in transformers and by lowest id here; the count and the
probabilities must still agree.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tinyserve.errors import TinyserveError
from tinyserve.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    probabilities,
    process_logits,
)

VOCABS = [1, 7, 50, 1000]
KINDS = ["normal", "ties", "extreme"]
SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------------------------- helpers


def make_logits(kind: str, V: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, V, KINDS.index(kind)])
    if kind == "normal":
        x = rng.standard_normal(V) * rng.uniform(0.5, 5.0)
    elif kind == "ties":  # few distinct values: ties everywhere, including at every boundary
        x = rng.integers(-3, 3, V).astype(np.float64) * rng.choice([0.5, 1.0, 2.0])
    else:  # huge magnitudes, masked (-inf) tokens, a few exact zeros
        x = rng.standard_normal(V) * 3
        n = max(1, V // 5)
        x[rng.integers(0, V, n)] = rng.choice([1e4, -1e4, 1e30, -1e30, 0.0, -np.inf], n)
        if not np.isfinite(x).any():
            x[rng.integers(0, V)] = 1.0
    return x.astype(np.float32)


def make_context(V: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, V, 99])
    # repeated ids and a few ids beyond the vocabulary (transformers ignores those)
    return rng.integers(0, V + 3, size=max(1, V // 3)).tolist()


def cases():
    for kind in KINDS:
        for V in VOCABS:
            for seed in SEEDS:
                yield kind, V, seed, make_logits(kind, V, seed), make_context(V, seed)


def hf_process(logits: np.ndarray, params: SamplingParams, context) -> np.ndarray:
    """What transformers' generate(do_sample=True) does to one row of scores, in its order."""
    scores = torch.tensor(logits, dtype=torch.float32).reshape(1, -1)
    input_ids = torch.tensor(list(context), dtype=torch.long).reshape(1, -1)
    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k != 0:
        procs.append(TopKLogitsWarper(int(params.top_k)))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(float(params.top_p)))
    if params.min_p > 0:
        procs.append(MinPLogitsWarper(float(params.min_p)))
    for proc in procs:
        scores = proc(input_ids, scores)
    assert scores.dtype == torch.float32
    return scores[0].numpy().copy()


def hf_probs(hf_logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(hf_logits), dim=-1).numpy().astype(np.float64)


def assert_same_as_hf(ours: np.ndarray, hf: np.ndarray, before_filters: np.ndarray, *, tie_swap: bool, what: str):
    """Same kept set (up to a swap among tokens tied at the top-p boundary), same logits, same probabilities."""
    assert ours.dtype == np.float32 and ours.shape == hf.shape, what
    ours_keep, hf_keep = ours > -np.inf, hf > -np.inf
    assert ours_keep.sum() == hf_keep.sum(), f"{what}: kept {ours_keep.sum()} tokens, transformers {hf_keep.sum()}"
    differ = ours_keep != hf_keep
    if differ.any():
        assert tie_swap, f"{what}: kept sets differ at ids {np.flatnonzero(differ).tolist()}"
        tied = before_filters[differ]
        boundary = before_filters[ours_keep].min()
        assert (tied == boundary).all() and before_filters[hf_keep].min() == boundary, (
            f"{what}: kept sets differ at ids {np.flatnonzero(differ).tolist()}, not a tie at the boundary"
        )
    both = ours_keep & hf_keep
    np.testing.assert_array_equal(ours[both], hf[both], err_msg=what)
    p_ours = probabilities_from_logits(ours)
    p_hf = hf_probs(hf)
    np.testing.assert_allclose(p_ours[both], p_hf[both], rtol=0, atol=1e-6, err_msg=what)
    np.testing.assert_allclose(np.sort(p_ours), np.sort(p_hf), rtol=0, atol=1e-6, err_msg=what)


def probabilities_from_logits(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ------------------------------------------------------------------------------ each step vs transformers


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    for kind, V, seed, x, ctx in cases():
        ours = apply_repetition_penalty(x, ctx, penalty)
        hf = hf_process(x, SamplingParams(temperature=1.0, repetition_penalty=penalty), ctx)
        assert ours.dtype == np.float32
        # float32 arithmetic, bit-identical to torch
        np.testing.assert_array_equal(ours, hf, err_msg=f"{kind} V={V} seed={seed}")


def test_repetition_penalty_definition():
    x = np.array([2.0, -2.0, 0.0, 4.0, -np.inf], dtype=np.float32)
    out = apply_repetition_penalty(x, [0, 1, 2, 4, 0, 0, 17], 2.0)  # repeats count once, 17 >= V ignored
    np.testing.assert_array_equal(out, [1.0, -4.0, 0.0, 4.0, -np.inf])
    np.testing.assert_array_equal(apply_repetition_penalty(x, [], 2.0), x)
    np.testing.assert_array_equal(apply_repetition_penalty(x, np.array([3]), 0.5), [2.0, -2.0, 0.0, 8.0, -np.inf])
    with pytest.raises(ValueError):
        apply_repetition_penalty(x, [-1], 2.0)


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 1.5])
def test_temperature_matches_transformers(temperature):
    for kind, V, seed, x, ctx in cases():
        params = SamplingParams(temperature=temperature)
        ours = process_logits(x, params, ctx)
        hf = hf_process(x, params, ctx)
        np.testing.assert_array_equal(ours, hf, err_msg=f"{kind} V={V} seed={seed}")


@pytest.mark.parametrize("top_k", [1, 2, 5, 25, 1000, 1003])
def test_top_k_matches_transformers(top_k):
    for kind, V, seed, x, ctx in cases():
        params = SamplingParams(temperature=1.0, top_k=top_k)
        ours = process_logits(x, params, ctx)
        hf = hf_process(x, params, ctx)
        # ties with the k-th value are all kept, in both
        assert_same_as_hf(ours, hf, x, tie_swap=False, what=f"top_k={top_k} {kind} V={V} seed={seed}")


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(top_p):
    for kind, V, seed, x, ctx in cases():
        params = SamplingParams(temperature=1.0, top_p=top_p)
        ours = process_logits(x, params, ctx)
        hf = hf_process(x, params, ctx)
        assert_same_as_hf(ours, hf, x, tie_swap=True, what=f"top_p={top_p} {kind} V={V} seed={seed}")


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(min_p):
    for kind, V, seed, x, ctx in cases():
        params = SamplingParams(temperature=1.0, min_p=min_p)
        ours = process_logits(x, params, ctx)
        hf = hf_process(x, params, ctx)
        assert_same_as_hf(ours, hf, x, tie_swap=False, what=f"min_p={min_p} {kind} V={V} seed={seed}")


CHAIN_PARAMS = [
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=1.5, top_k=40, top_p=0.5, min_p=0.1, repetition_penalty=0.8),
    SamplingParams(temperature=0.05, top_k=0, top_p=0.95, min_p=0.0, repetition_penalty=2.0),
    SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.3, repetition_penalty=1.0),
    SamplingParams(temperature=2.0, top_k=100, top_p=0.3, min_p=0.0, repetition_penalty=1.1),
    SamplingParams(temperature=0.9, top_k=0, top_p=0.999, min_p=0.5, repetition_penalty=1.2),
]


@pytest.mark.parametrize("params", CHAIN_PARAMS, ids=range(len(CHAIN_PARAMS)))
def test_whole_chain_matches_transformers(params):
    unfiltered = SamplingParams(temperature=params.temperature, repetition_penalty=params.repetition_penalty)
    for kind, V, seed, x, ctx in cases():
        what = f"{params} {kind} V={V} seed={seed}"
        ours = process_logits(x, params, ctx)
        hf = hf_process(x, params, ctx)
        before_filters = process_logits(x, unfiltered, ctx)  # after penalty and temperature
        assert_same_as_hf(ours, hf, before_filters, tie_swap=True, what=what)
        p = probabilities(x, params, ctx)
        assert p.shape == (V,) and math.isclose(p.sum(), 1.0, abs_tol=1e-12)
        np.testing.assert_allclose(np.sort(p), np.sort(hf_probs(hf)), rtol=0, atol=1e-6, err_msg=what)


# --------------------------------------------------------------------------------- boundaries and ties


def test_top_k_keeps_every_token_tied_with_the_kth():
    x = np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32)
    ours = process_logits(x, SamplingParams(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(ours, [-np.inf, 3.0, 3.0, -np.inf])
    np.testing.assert_array_equal(ours, hf_process(x, SamplingParams(temperature=1.0, top_k=1), []))


@pytest.mark.parametrize(
    "V, top_p, kept",
    [
        (10, 0.9, 9),  # cumulative 0.9 >= 0.9 exactly: 9 tokens, not 10 (float32(1 - 0.9) == float32(0.1))
        (4, 0.5, 2),
        (4, 0.51, 3),
        (4, 1e-6, 1),
        (3, 1.0, 3),
    ],
)
def test_top_p_boundary_with_equal_logits(V, top_p, kept):
    x = np.zeros(V, dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    ours = process_logits(x, params)
    # ties at the boundary: the lowest ids are kept
    np.testing.assert_array_equal(np.flatnonzero(ours > -np.inf), np.arange(kept))
    assert (hf_process(x, params, []) > -np.inf).sum() == kept


def test_top_p_keeps_smallest_set_reaching_top_p():
    x = np.log(np.array([0.1, 0.4, 0.2, 0.3])).astype(np.float32)
    keep = lambda p: np.flatnonzero(process_logits(x, SamplingParams(temperature=1.0, top_p=p)) > -np.inf).tolist()
    assert keep(0.35) == [1]
    assert keep(0.6) == [1, 3]
    assert keep(0.75) == [1, 2, 3]
    assert keep(0.95) == [0, 1, 2, 3]


def test_min_p_definition():
    x = np.log(np.array([0.5, 0.25, 0.2, 0.05])).astype(np.float32)
    keep = lambda m: np.flatnonzero(process_logits(x, SamplingParams(temperature=1.0, min_p=m)) > -np.inf).tolist()
    assert keep(0.3) == [0, 1, 2]  # threshold 0.15
    assert keep(0.45) == [0, 1]  # threshold 0.225
    assert keep(1.0) == [0]
    assert keep(0.0) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_after_repetition_penalty():
    for kind, V, seed, x, ctx in cases():
        assert Sampler(SamplingParams())(x) == int(np.argmax(x))
        for penalty in (1.0, 1.5, 0.5):
            sampler = Sampler(SamplingParams(repetition_penalty=penalty))
            hf = hf_process(x, SamplingParams(temperature=1.0, repetition_penalty=penalty), ctx)
            token = sampler(x, ctx)
            assert token == int(torch.argmax(torch.from_numpy(hf)))
            p = probabilities(x, SamplingParams(repetition_penalty=penalty, top_k=3, top_p=0.2), ctx)
            assert p[token] == 1.0 and p.sum() == 1.0  # greedy: one-hot, filters have nothing to do


def test_greedy_ties_go_to_lowest_id_and_use_no_randomness():
    x = np.array([0.0, 5.0, 1.0, 5.0, 5.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(seed=3))
    state = sampler.rng.bit_generator.state
    assert [sampler(x) for _ in range(5)] == [1] * 5
    assert sampler.rng.bit_generator.state == state
    assert Sampler(SamplingParams(repetition_penalty=2.0))(x, [1]) == 3


# ---------------------------------------------------------------------------------------- sampling draws


def _draws(seed, n=300, V=50):
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1, seed=seed)
    sampler = Sampler(params)
    logit_rng = np.random.default_rng(1234)  # the same logits for every seed
    ctx: list[int] = [3, 4]
    for _ in range(n):
        ctx.append(sampler(logit_rng.standard_normal(V).astype(np.float32) * 2, ctx))
    return ctx[2:]


def test_same_seed_same_tokens_different_seed_different_tokens():
    a = _draws(7)
    assert a == _draws(7)
    assert a != _draws(8)
    assert all(isinstance(t, int) for t in a)


def test_empirical_frequencies_match_probabilities():
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.95, min_p=0.02, seed=2024)
    x = (np.random.default_rng(5).standard_normal(20) * 1.5).astype(np.float32)
    ctx = [0, 1]
    p = probabilities(x, params, ctx)
    sampler = Sampler(params)
    n = 20_000
    counts = np.bincount([sampler(x, ctx) for _ in range(n)], minlength=x.size)
    assert counts[p == 0].sum() == 0  # removed tokens are never drawn
    sigma = np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) <= 5 * sigma + 1).all(), (counts, n * p)
    chi2 = (((counts - n * p) ** 2)[p > 0] / (n * p[p > 0])).sum()
    assert chi2 < 3 * (p > 0).sum() + 10


def test_inputs_are_not_modified_and_output_is_float32():
    x = make_logits("normal", 50, 0)
    before = x.copy()
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.3, seed=0)
    out = process_logits(x, params, [1, 2])
    assert out.dtype == np.float32 and out.shape == (50,)
    apply_repetition_penalty(x, [1, 2], 1.3)
    Sampler(params)(x, [1, 2])
    np.testing.assert_array_equal(x, before)
    assert process_logits(x.astype(np.float64), params, [1, 2]).dtype == np.float32


@pytest.mark.parametrize(
    "logits",
    [[1.0, np.nan], [np.inf, 0.0], [-np.inf, -np.inf], [], [[1.0, 2.0]]],
    ids=["nan", "inf", "all-masked", "empty", "2d"],
)
def test_bad_logits_raise_value_error(logits):
    with pytest.raises(ValueError):
        process_logits(np.array(logits, dtype=np.float32), SamplingParams(temperature=1.0))


# --------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("min_p", float("inf")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", float("nan")),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", "7"),
    ],
)
def test_validate_rejects_bad_values(name, value):
    params = SamplingParams(**{name: value})
    with pytest.raises(TinyserveError) as info:
        params.validate()
    message = str(info.value)
    assert name in message and "\n" not in message
    with pytest.raises(TinyserveError):
        Sampler(params)
    with pytest.raises(TinyserveError):
        process_logits(np.zeros(3, dtype=np.float32), params)


def test_validate_accepts_good_values():
    for params in [
        SamplingParams(),
        SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0, repetition_penalty=1, seed=0),
        SamplingParams(temperature=0.01, top_k=10**6, top_p=1e-9, min_p=1.0, repetition_penalty=1e-3, seed=2**63),
        SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.int64(5)),
    ]:
        assert params.validate() is params


# ---------------------------------------------------------------------------------------------- property

_logits = hnp.arrays(
    np.float32,
    st.integers(1, 40),
    elements=st.one_of(
        st.floats(-1e4, 1e4, width=32),
        st.sampled_from([0.0, 1.0, -np.inf]),
    ),
).filter(lambda a: np.isfinite(a).any())

_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 5.0)),
    top_k=st.integers(0, 45),
    top_p=st.floats(1e-6, 1.0),
    min_p=st.floats(0.0, 1.0),
    repetition_penalty=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**32),
)


@settings(max_examples=150, deadline=None)
@given(x=_logits, params=_params, ctx=st.lists(st.integers(0, 50), max_size=10))
def test_probabilities_are_a_distribution_over_kept_tokens(x, params, ctx):
    out = process_logits(x, params, ctx)
    p = probabilities(x, params, ctx)
    assert p.shape == x.shape and p.dtype == np.float64
    assert math.isclose(p.sum(), 1.0, abs_tol=1e-9)
    assert (p >= 0).all()
    removed = out == -np.inf
    assert (p[removed] == 0).all()
    assert not removed.all()
    # the filters only remove tokens: survivors keep their value after the penalty and the temperature
    unfiltered = SamplingParams(temperature=params.temperature, repetition_penalty=params.repetition_penalty)
    np.testing.assert_array_equal(out[~removed], process_logits(x, unfiltered, ctx)[~removed])
    if params.greedy:
        assert (~removed).sum() == 1
    token = Sampler(params)(x, ctx)
    assert 0 <= token < x.size and p[token] > 0
