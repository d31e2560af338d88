"""Sampling and stop strings: the parts of generation that do not need a model."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.runtime.generation import StopMatcher
from edge_sdk.runtime.sampling import Sampler, SamplingParams, entropy_and_logprob


def test_greedy_takes_the_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_top_k_and_top_p_only_pick_allowed_tokens() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000).astype(np.float32)
    order = np.argsort(-logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    # The nucleus for 0.5: the smallest prefix of the sorted tokens reaching that mass.
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)].tolist())
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=3))
    picks = {sampler(logits) for _ in range(400)}
    assert picks <= nucleus and len(picks) > 1
    top3 = set(order[:3].tolist())
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=3))
    assert {sampler(logits) for _ in range(200)} == top3


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(1).normal(size=1000)
    a = [Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=5))(logits) for _ in range(3)]
    assert len(set(a)) == 1


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_entropy() -> None:
    uniform = np.zeros(8)
    h, lp = entropy_and_logprob(uniform, 3)
    assert h == pytest.approx(np.log(8)) and lp == pytest.approx(-np.log(8))
    peaked = np.array([100.0, 0, 0, 0])
    assert entropy_and_logprob(peaked, 0)[0] == pytest.approx(0, abs=1e-6)


def _run(stops: list[str], pieces: list[str]) -> tuple[str, str | None, list[str]]:
    m = StopMatcher(stops)
    out, emitted = [], []
    for p in pieces:
        text, hit = m.feed(p)
        emitted.append(text)
        out.append(text)
        if hit:
            return "".join(out), hit, emitted
    tail = m.flush()
    return "".join(out) + tail, None, emitted


def test_stop_across_pieces_is_cut_and_never_emitted() -> None:
    text, hit, emitted = _run(["</end>"], ["hello <", "/en", "d> more"])
    assert text == "hello " and hit == "</end>"
    assert not any("<" in e for e in emitted)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    text, hit, emitted = _run(["STOP"], ["a ST", "ray cat"])
    assert hit is None and text == "a STray cat"
    assert emitted[0] == "a "  # "ST" was held back until it could not be the stop string


def test_earliest_stop_wins() -> None:
    text, hit, _ = _run(["cat", "a c"], ["the a cat"])
    assert text == "the " and hit == "a c"
