"""Workload generators: pure functions of the seed, the same on every backend, shaped as stated.

The formulas are checked through differences: every generator's noise stream is the one of
:func:`uniform` with the same seed, so ``generator(...) - uniform(...)`` is exactly its
``log p_{t,e}`` term, which the docstring states.
"""

from __future__ import annotations

import numpy as np
import pytest

from moerouter import workloads
from moerouter.testing import to_numpy

GENERATORS = {
    "uniform": {},
    "zipf": {"exponent": 1.1},
    "bursty": {"sequence_length": 7, "num_topics": 3},
    "token_correlated": {"vocab_size": 50},
    "hot_spikes": {"num_windows": 3, "spike_probability": 0.3},
}


def generate(name, *args, **kwargs):
    return getattr(workloads, name)(*args, **{**GENERATORS[name], **kwargs})


@pytest.mark.parametrize("name", list(GENERATORS))
def test_deterministic_per_seed(name):
    first = generate(name, 40, 6, seed=3)
    again = generate(name, 40, 6, seed=3)
    assert first.dtype == np.float32 and first.shape == (40, 6)
    np.testing.assert_array_equal(first.view(np.uint32), again.view(np.uint32))
    assert not np.array_equal(first, generate(name, 40, 6, seed=4))
    # A sequence seed is a seed too: (seed, layer, step) names one draw.
    np.testing.assert_array_equal(
        generate(name, 9, 6, seed=(1, 2)), generate(name, 9, 6, seed=(1, 2))
    )
    assert not np.array_equal(generate(name, 9, 6, seed=(1, 2)), generate(name, 9, 6, seed=(2, 1)))


@pytest.mark.parametrize("name", list(GENERATORS))
def test_same_values_on_every_backend(name, backend):
    xp = backend.namespace()
    reference = generate(name, 33, 5, seed=11)
    on_backend = generate(name, 33, 5, seed=11, xp=xp)
    assert (
        type(on_backend).__module__.partition(".")[0]
        == type(xp.asarray(0)).__module__.partition(".")[0]
    )
    np.testing.assert_array_equal(to_numpy(on_backend).view(np.uint32), reference.view(np.uint32))
    like = generate(name, 33, 5, seed=11, like=xp.zeros(1))
    np.testing.assert_array_equal(to_numpy(like), reference)


def test_device_follows_like():
    torch = pytest.importorskip("torch")
    meta = torch.empty(0, device="meta")  # no data: proves the device is taken, not defaulted
    logits = workloads.zipf(4, 3, like=meta)
    assert logits.device == meta.device and logits.shape == (4, 3)
    cpu = workloads.uniform(4, 3, xp=pytest.importorskip("array_api_compat.torch"), device="cpu")
    assert cpu.device.type == "cpu"


@pytest.mark.parametrize("name", list(GENERATORS))
def test_zero_tokens(name):
    assert generate(name, 0, 4).shape == (0, 4)


def test_structure_seed_keeps_popularity_and_changes_noise():
    # A layer keeps its popular experts from step to step; the tokens change.
    one = workloads.zipf(5, 16, seed=(0, 0), structure_seed=7) - workloads.uniform(
        5, 16, seed=(0, 0)
    )
    two = workloads.zipf(5, 16, seed=(0, 1), structure_seed=7) - workloads.uniform(
        5, 16, seed=(0, 1)
    )
    np.testing.assert_allclose(one[0], two[0], atol=1e-5)
    other = workloads.zipf(5, 16, seed=(0, 0), structure_seed=8) - workloads.uniform(
        5, 16, seed=(0, 0)
    )
    assert not np.allclose(one[0], other[0], atol=1e-3)


# ---- the formulas of the docstrings --------------------------------------------------------


def test_zipf_log_popularity_is_the_stated_law():
    exponent, experts = 1.3, 12
    difference = workloads.zipf(6, experts, exponent=exponent, seed=2) - workloads.uniform(
        6, experts, seed=2
    )
    # The difference is log p_e, the same for every token.
    np.testing.assert_allclose(
        difference, np.broadcast_to(difference[0], difference.shape), atol=2e-5
    )
    popularity = np.sort(np.exp(difference[0].astype(np.float64)))[::-1]
    law = np.arange(1, experts + 1, dtype=np.float64) ** -exponent
    np.testing.assert_allclose(popularity, law / law.sum(), rtol=2e-5)


def test_zipf_top1_frequencies_follow_the_law():
    # Gumbel-max: a token's top-1 is expert e with probability p_e exactly; 60k draws.
    experts, tokens, exponent = 8, 60_000, 1.0
    logits = workloads.zipf(tokens, experts, exponent=exponent, seed=5)
    log_p = (logits - workloads.uniform(tokens, experts, seed=5))[0].astype(np.float64)
    shares = np.bincount(logits.argmax(axis=1), minlength=experts) / tokens
    expected = np.exp(log_p)
    # Binomial standard error is below 0.002 per share: 5 sigma is 0.01.
    np.testing.assert_allclose(shares, expected, atol=0.01)
    assert np.argmax(shares) == np.argmax(expected)


def test_uniform_top1_is_uniform():
    shares = np.bincount(workloads.uniform(40_000, 5, seed=1).argmax(axis=1), minlength=5) / 40_000
    np.testing.assert_allclose(shares, 0.2, atol=0.01)


def test_zero_strength_generators_are_uniform():
    # zipf(0) shifts every logit by the same -log E; the others add exactly nothing.
    base = workloads.uniform(30, 6, seed=9)
    np.testing.assert_allclose(
        workloads.zipf(30, 6, exponent=0.0, seed=9), base - np.log(6), atol=1e-5
    )
    np.testing.assert_array_equal(workloads.bursty(30, 6, topic_scale=0.0, seed=9), base)
    np.testing.assert_array_equal(workloads.token_correlated(30, 6, strength=0.0, seed=9), base)
    np.testing.assert_allclose(
        workloads.hot_spikes(30, 6, boost=0.0, seed=9), base - np.log(6), atol=1e-5
    )


def test_bursty_topics_hold_within_a_sequence_and_switch():
    kwargs = {"sequence_length": 10, "num_topics": 4, "topic_scale": 2.0}
    base = workloads.uniform(60, 8, seed=4)
    steady = workloads.bursty(60, 8, switch_probability=0.0, seed=4, **kwargs) - base
    per_sequence = steady.reshape(6, 10, 8)
    # No switch: every token of a sequence has the sequence's topic row.
    # (G + mu) - G rounds in float32: equal to ~1 ulp of the noise.
    np.testing.assert_allclose(
        per_sequence, np.broadcast_to(per_sequence[:, :1], per_sequence.shape), atol=1e-5
    )
    topics = {tuple(np.round(row, 4)) for row in per_sequence[:, 0]}
    assert 1 < len(topics) <= 4  # sequences draw among the Z topics
    jumpy = workloads.bursty(60, 8, switch_probability=1.0, seed=4, **kwargs) - base
    changes = np.any(np.abs(jumpy[1:] - jumpy[:-1]) > 1e-4, axis=1).mean()
    assert changes > 0.5  # a redraw at every token: changes unless the same topic comes back


def test_bursty_loads_are_skewed_within_a_burst_only():
    tokens, experts = 20_000, 16
    logits = workloads.bursty(
        tokens, experts, sequence_length=1000, switch_probability=0.0, topic_scale=2.0, seed=1
    )
    top1 = logits.argmax(axis=1).reshape(20, 1000)
    per_sequence_max = max(np.bincount(row, minlength=experts).max() / 1000 for row in top1)
    overall = np.bincount(top1.reshape(-1), minlength=experts) / tokens
    assert per_sequence_max > 3 / experts  # a topic concentrates the load
    assert overall.max() < per_sequence_max  # averaging over sequences spreads it


def test_token_correlated_same_id_same_preferences():
    ids = np.array([3, 7, 3, 3, 7, 0])
    difference = workloads.token_correlated(6, 5, token_ids=ids, seed=2) - workloads.uniform(
        6, 5, seed=2
    )
    np.testing.assert_allclose(difference[0], difference[2], atol=1e-5)
    np.testing.assert_allclose(difference[1], difference[4], atol=1e-5)
    assert not np.allclose(difference[0], difference[1], atol=1e-3)
    # Drawn ids follow the Zipf law over the vocabulary: id 0 is the most frequent.
    strong = workloads.token_correlated(20_000, 8, vocab_size=100, strength=20.0, seed=0)
    top1 = strong.argmax(axis=1)
    assert np.bincount(top1, minlength=8).max() / 20_000 > 1.5 / 8  # loads inherit the skew


def test_hot_spikes_boost_the_hot_experts_of_their_window():
    tokens, experts, boost = 30_000, 6, 2.0
    kwargs = {"num_windows": 3, "spike_probability": 0.3, "seed": 8}
    logits = workloads.hot_spikes(tokens, experts, boost=boost, **kwargs)
    hot = (logits - workloads.hot_spikes(tokens, experts, boost=0.0, **kwargs)) > boost / 2
    window = np.arange(tokens) * 3 // tokens
    # A hot expert is hot for its whole window and nowhere else.
    for w in range(3):
        rows = hot[window == w]
        np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
    checked = 0
    for w in range(3):
        in_window = window == w
        hot_here = hot[in_window][0]
        count = int(hot_here.sum())
        if 0 < count < experts:
            share = np.isin(logits[in_window].argmax(axis=1), np.flatnonzero(hot_here)).mean()
            expected = count * np.exp(boost) / (count * np.exp(boost) + experts - count)
            assert abs(share - expected) < 0.03
            checked += 1
    assert checked  # the seed gives at least one window with some hot experts


# ---- errors and specs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: workloads.zipf(4, 0), "num_experts"),  # no experts
        (lambda: workloads.zipf(-1, 4), "num_tokens"),  # negative tokens
        (lambda: workloads.zipf(4, 4, exponent=-1.0), "exponent"),  # negative exponent
        (lambda: workloads.bursty(4, 4, switch_probability=1.5), "switch_probability"),
        (lambda: workloads.bursty(4, 4, sequence_length=0), "sequence_length"),
        (lambda: workloads.hot_spikes(4, 4, spike_probability=2.0), "spike_probability"),
        (
            lambda: workloads.token_correlated(2, 4, token_ids=np.array([0, 99]), vocab_size=10),
            "token_ids",
        ),
        (lambda: workloads.token_correlated(2, 4, token_ids=np.array([0])), "token_ids"),
        (lambda: workloads.uniform(4, 4, seed=-1), "seed"),  # negative seed
        (lambda: workloads.uniform(4, 4, seed="a"), "seed"),  # not a seed
        (lambda: workloads.zipf(4, 4, structure_seed=1.5), "structure_seed"),
        (lambda: workloads.uniform(4, 4, device="cuda"), "device"),  # no backend given
        (lambda: workloads.uniform(4, 4, xp=np, like=np.zeros(1)), "like"),  # both
    ],
)
def test_bad_input_names_the_parameter(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_from_spec():
    assert workloads.from_spec("zipf:1.2").keywords == {"exponent": 1.2}
    assert workloads.from_spec("zipf").keywords == {}
    assert workloads.from_spec("hot-spikes:0.1,boost=2").keywords == {
        "spike_probability": 0.1,
        "boost": 2,
    }
    generator = workloads.from_spec("bursty:sequence_length=4,switch_probability=0.5")
    np.testing.assert_array_equal(
        generator(8, 3, seed=1),
        workloads.bursty(8, 3, sequence_length=4, switch_probability=0.5, seed=1),
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pareto:1", "unknown workload"),  # not a generator
        ("zipf:abc", "not a number"),  # not a number
        ("zipf:-1", "exponent"),  # checked at once, not at the first draw
        ("uniform:3", "takes no value"),  # uniform has no main parameter
        ("zipf:temperature=2", "no parameter 'temperature'"),  # unknown keyword
        ("zipf:seed=3", "no parameter 'seed'"),  # the seed belongs to the caller
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        workloads.from_spec(spec)
