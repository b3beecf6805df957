"""One meaning of sampling: the numpy runtime side and the torch reference side process logits the
same way (repetition penalty, temperature, top-k, top-p), and both equal transformers' own logits
processors, the independent reference for that order."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core import sampling as np_sampling
from core.sampling import Sampler, SamplingConfig
from nanovlm import generation as torch_sampling

SETTINGS = [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.3, top_k=20),
    SamplingConfig(temperature=0.8, top_p=0.9),
    SamplingConfig(temperature=0.5, top_k=50, top_p=0.8),
    SamplingConfig(temperature=2.0, top_k=5, top_p=0.5, repetition_penalty=1.3),
]


def _transformers(logits: np.ndarray, seen: np.ndarray, c: SamplingConfig) -> np.ndarray:
    """transformers' processors in its generate() order: penalty, temperature, top-k, top-p."""
    scores = torch.from_numpy(logits).double()
    ids = torch.from_numpy(seen)
    if c.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(c.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(c.temperature)(ids, scores)
    if c.top_k:
        scores = TopKLogitsWarper(c.top_k)(ids, scores)
    if c.top_p < 1.0:
        scores = TopPLogitsWarper(c.top_p)(ids, scores)
    return scores.softmax(-1).numpy()


@pytest.mark.parametrize(
    "config", SETTINGS, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}-r{c.repetition_penalty}"
)
def test_processed_distributions_agree_to_1e_6(config):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    seen = rng.integers(0, 300, (4, 12))
    ref = _transformers(logits, seen, config)

    penalized = logits.copy()
    if config.repetition_penalty != 1.0:
        penalized = np_sampling.penalize(penalized, seen.tolist(), config.repetition_penalty)
    ours_np = np_sampling.probabilities(penalized, config)
    t = torch.from_numpy(logits)
    if config.repetition_penalty != 1.0:
        t = torch_sampling.penalize(t, torch.from_numpy(seen), config.repetition_penalty)
    ours_torch = torch_sampling.probabilities(t, config).numpy()

    # float32 logits through float64 arithmetic on every side: differences are rounding only
    assert np.abs(ours_np - ref).max() < 1e-6
    assert np.abs(ours_torch - ref).max() < 1e-6
    assert np.abs(ours_np - ours_torch).max() < 1e-6
    if config.top_k or config.top_p < 1.0:  # the filters really removed tokens
        assert (ref == 0).any()


def test_temperature_applies_before_top_p():
    """At a high temperature top-p keeps more tokens than at a low one: the order is observable."""
    logits = np.log(np.array([[0.6, 0.25, 0.1, 0.05]], np.float32))
    cold = np_sampling.probabilities(logits, SamplingConfig(temperature=0.5, top_p=0.8))
    hot = np_sampling.probabilities(logits, SamplingConfig(temperature=2.0, top_p=0.8))
    assert (cold > 0).sum() == 1 and (hot > 0).sum() == 3


def test_seeded_sampler_is_reproducible_and_greedy_is_argmax():
    logits = np.random.default_rng(1).standard_normal((2, 50)).astype(np.float32)
    a = [Sampler(SamplingConfig(temperature=1.0, seed=3))(logits).tolist() for _ in range(2)]
    assert a[0] == a[1]
    assert Sampler(SamplingConfig())(logits).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(repetition_penalty=0),
        dict(temperature=float("nan")),
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_a_tiny_temperature_samples_the_top_token_instead_of_nan():
    """Logits over a subnormal temperature overflow to inf, and the softmax to NaN, unless they are
    shifted first; the server accepts any temperature in [0, 2], these included."""
    import numpy as np

    from core.sampling import Sampler

    logits = np.array([[0.5, 3.0, -1.0, 2.9]], np.float32)
    for t in (2.225073858507e-311, 1e-300, 1e-30):
        assert Sampler(SamplingConfig(temperature=t, seed=0))(logits).tolist() == [1]
