"""Synthetic requests for the reference engine: Poisson arrivals, random lengths, random tokens.

Everything is drawn from one ``random.Random(seed)``, so a seed names one workload exactly. The
prompts are random token ids: there is no text anywhere, and nothing about a request's content
ever reaches a span (the step span only counts sequences and tokens).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

LENGTH_DISTRIBUTIONS = ("exponential", "uniform", "fixed")

#: Lengths are clipped to this many times their mean, so one unlucky draw cannot outgrow the
#: KV cache (and the engine can size the cache from the means alone).
MAX_LENGTH_FACTOR = 4


@dataclass(frozen=True)
class RequestSpec:
    """One request as the client sends it."""

    rid: int
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class WorkloadConfig:
    requests: int = 40
    rate: float = 8.0  # requests per second; math.inf: all arrive at once
    prompt_len: int = 96
    output_len: int = 24
    length_dist: str = "exponential"
    vocab_size: int = 512
    seed: int = 0

    def max_prompt_len(self) -> int:
        return max_length(self.prompt_len, self.length_dist)

    def max_output_len(self) -> int:
        return max_length(self.output_len, self.length_dist)


def max_length(mean: int, dist: str) -> int:
    """The longest length :func:`draw_length` can return for ``mean``."""
    if dist == "fixed":
        return mean
    if dist == "uniform":
        return 2 * mean - 1
    return MAX_LENGTH_FACTOR * mean


def draw_length(rng: random.Random, mean: int, dist: str) -> int:
    """A length >= 1 with the given mean (before clipping)."""
    if mean < 1:
        raise ValueError(f"mean length must be >= 1, got {mean}")
    if dist == "fixed":
        return mean
    if dist == "uniform":
        return rng.randint(1, 2 * mean - 1)
    if dist == "exponential":
        # 1 + Exp(mean - 1): a long tail of long prompts, so chunked prefill gets exercised.
        value = 1 + int(round(rng.expovariate(1.0 / (mean - 1)))) if mean > 1 else 1
        return min(value, max_length(mean, dist))
    raise ValueError(f"unknown length distribution {dist!r}; choose from {', '.join(LENGTH_DISTRIBUTIONS)}")


def make_workload(config: WorkloadConfig) -> list[RequestSpec]:
    """The requests of ``config``, in arrival order. Deterministic under ``config.seed``."""
    if config.requests < 0:
        raise ValueError("requests must be >= 0")
    if not (config.rate > 0):
        raise ValueError("rate must be > 0 (math.inf: all at once)")
    rng = random.Random(config.seed)
    now = 0.0
    specs: list[RequestSpec] = []
    for rid in range(config.requests):
        if not math.isinf(config.rate):
            now += rng.expovariate(config.rate)
        prompt_len = draw_length(rng, config.prompt_len, config.length_dist)
        output_len = draw_length(rng, config.output_len, config.length_dist)
        prompt = tuple(rng.randrange(config.vocab_size) for _ in range(prompt_len))
        specs.append(RequestSpec(rid, now, prompt, output_len))
    return specs
