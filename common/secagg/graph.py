"""Who shares secrets with whom: SecAgg+'s sparse graph. The clients that advertised keys are
put in a seeded random order on a ring and each is joined to the k/2 nearest on either side (a
Harary graph on a random permutation, as Bell et al. use), so a device deals k shares and masks
with k neighbours whatever the number of devices n; k grows like log n.

The order's seed is the coordinator's and public: the graph only has to be unrelated to who the
clients are, and every party computes the same one from the list of members.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def default_degree(n: int) -> int:
    """k for n clients: an even number near 2 log2 n, at least 4 (SecAgg+'s O(log n)); all the
    others when n is that small."""
    if n <= 1:
        return 0
    k = max(4, 2 * math.ceil(math.log2(n)))
    k += k % 2
    return min(k, n - 1)


def default_threshold(degree: int, fraction: float) -> int:
    """Shares needed to rebuild a secret: more than `fraction` of the k shares, at least 2 (one
    share alone must never be enough) and at most k."""
    return max(min(2, degree), min(degree, math.floor(fraction * degree) + 1))


def neighbours(members: Sequence[str], degree: int, seed: str) -> dict[str, list[str]]:
    """Each member's neighbours, sorted. `members` in any order: the ring order comes from
    `seed` alone (sha256 of seed and client id), so the result does not depend on how the
    caller listed them."""
    order = sorted(members, key=lambda c: hashlib.sha256(f"{seed}\x1f{c}".encode()).digest())
    n = len(order)
    if degree >= n - 1:
        return {c: sorted(m for m in order if m != c) for c in order}
    if degree < 2 or degree % 2:
        raise ValueError(f"a Harary ring needs an even degree >= 2, got {degree}")
    half = degree // 2
    out: dict[str, list[str]] = {}
    for pos, client in enumerate(order):
        near = {order[(pos + d) % n] for d in range(-half, half + 1) if d != 0}
        out[client] = sorted(near)
    return out

