"""Trace and span ids that an engine seeding Python's ``random`` cannot repeat.

Engines seed the global ``random`` generator for reproducible sampling (vLLM seeds it with 0 by
default), and the OpenTelemetry SDK's ``RandomIdGenerator`` draws ids from that very generator:
two engines with the same seed then make the same ids, and a backend merges their traces. Ids
here come from a generator of our own, seeded from the operating system's entropy and seeded
again in every forked child (which would otherwise repeat its parent's ids).
"""

from __future__ import annotations

import os
import random

_generator = random.Random(os.urandom(32))


def _reseed() -> None:
    _generator.seed(os.urandom(32))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


#: The generator's own draw, for callers that cannot afford :func:`random_bits`'s frame; it
#: may return zero. Reseeding keeps the generator, so this stays bound to it across a fork.
getrandbits = _generator.getrandbits


def random_bits(bits: int) -> int:
    """A random non-zero integer of ``bits`` bits (zero is the invalid id)."""
    return _generator.getrandbits(bits) or 1
