"""Token selection in numpy: greedy, or sampling from the logits after, in this order,
repetition penalty, temperature, top-k and top-p (the order of transformers' logits processors
and of llama.cpp's sampler chain). nanovlm/generation.py applies the same steps to torch tensors;
tests check both against transformers' own warpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the sequence
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# nanoVLM's generate(..., top_k=50, top_p=0.9, temperature=0.5, greedy=False): its defaults
NANOVLM_DEFAULTS = {"greedy": False, "top_k": 50, "top_p": 0.9, "temperature": 0.5}


def from_nanovlm(
    greedy: bool | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> SamplingConfig:
    """The SamplingConfig nanoVLM's keyword arguments mean: the ones not given take nanoVLM's
    defaults (it samples unless greedy=True), greedy=True picks the arg-max whatever the rest."""
    given = {"greedy": greedy, "top_k": top_k, "top_p": top_p, "temperature": temperature}
    kw = {k: NANOVLM_DEFAULTS[k] if v is None else v for k, v in given.items()}
    if kw["greedy"]:
        return SamplingConfig(seed=seed)
    return SamplingConfig(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"], seed=seed)


def penalize(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    """The CTRL / transformers rule on each row's seen tokens: shrink positive logits, push
    negative ones further. logits float32 [B, V], changed in place and returned."""
    for row, tokens in enumerate(seen):
        if tokens:
            idx = np.unique(np.asarray(tokens, dtype=np.int64))
            vals = logits[row, idx]
            logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def probabilities(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution sampled from: logits [B, V] / temperature, top-k, top-p, softmax -> [B, V]."""
    logits = logits.astype(np.float64)
    # shifted first: a tiny temperature then sends the rest to -inf, never the maximum to inf (NaN)
    with np.errstate(over="ignore"):
        logits = (logits - logits.max(-1, keepdims=True)) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = np.partition(logits, -config.top_k, axis=-1)[:, -config.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = _softmax(logits)
    if config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass of the tokens ranked above
        drop_sorted = before >= config.top_p  # the most likely token always stays
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return probs


TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # (token, its logprob, [(id, logprob)] top first)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log-softmax of one row's logits [V] (as the sampler got them: after any constraint's mask,
    before temperature, top-k and top-p): the chosen token's and the `top` most likely ones'
    (tokens a constraint forbids are not among them)."""
    x = logits.astype(np.float64)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    best = np.argpartition(-lp, top - 1)[:top] if 0 < top < lp.shape[0] else np.arange(lp.shape[0])[:top]
    best = best[np.argsort(-lp[best], kind="stable")]
    return token, float(lp[token]), [(int(i), float(lp[i])) for i in best if np.isfinite(lp[i])]


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen: list[list[int]] | None = None) -> np.ndarray:
        """logits float32 [B, V] -> next ids int64 [B]; `seen` holds each row's tokens so far."""
        c = self.config
        if c.repetition_penalty != 1.0 and seen:
            logits = penalize(logits.astype(np.float32, copy=True), seen, c.repetition_penalty)
        if c.greedy:
            return logits.argmax(-1).astype(np.int64)
        probs = probabilities(logits, c)
        return np.array([self.rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)
