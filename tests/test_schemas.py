"""Request bodies as the router parses them (router/schemas.py)."""

from __future__ import annotations

import pytest

from llamapool.pool.prepare import llama_seed
from llamapool.router.schemas import CompletionRequest, parse_body


@pytest.mark.parametrize("seed", [-2, 0, 7, 2**32 - 2, 2**63 - 1])
def test_every_sample_of_a_seeded_request_is_repeatable_and_distinct(seed):
    body = parse_body(
        b'{"model": "m", "prompt": "x", "n": 3, "seed": %d}' % seed, CompletionRequest
    )
    seeds = [llama_seed(body.sampling(sample=j).seed) for j in range(3)]
    # None would be a random seed: a seeded request's samples must each be repeatable.
    assert None not in seeds and len(set(seeds)) == 3, seeds
