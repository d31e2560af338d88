"""The sum of a round's masked updates, and nothing else (ARCHITECTURE.md, "Secure aggregation").

sum over U3 of masked_i = sum of q_i + sum of PRG(b_i) + the pairwise masks that did not cancel:
those between an uploader i and a neighbour d that dealt shares (so i masked against it) but
never uploaded. The coordinator rebuilds each uploader's self-mask seed b_i and each such
dropped neighbour's masking key from the shares revealed in the unmask phase, removes their
masks, and is left with sum of q_i: the weighted, quantised sum. It never holds both secrets of
one device, so no single update can be unmasked.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cloud.secure.phases import REVEAL, SecureRound
from common.secagg import crypto, shamir
from common.secagg.ring import Layout, dequantize, size_of


class UnmaskError(RuntimeError):
    """The shares revealed cannot rebuild a secret the sum needs."""


@dataclass(frozen=True)
class MaskedUpdate:
    client_id: str
    flat: np.ndarray  # uint64, the layout's length
    weight: int


@dataclass(frozen=True)
class Unmasked:
    mean: np.ndarray  # float64, the weighted mean over the uploaders
    total_weight: int
    out_of_range: int  # coordinates whose mean fell outside [-clip, clip]: some upload was not in range
    rebuilt_seeds: int
    rebuilt_keys: int


def pair_sign(me: str, other: str) -> int:
    """+1 for the smaller client id of a pair, -1 for the larger: their masks cancel in the sum."""
    return 1 if me < other else -1


def pair_seed(private: bytes, peer_public: bytes, run_id: str, number: int, me: str, other: str) -> bytes:
    return crypto.agree(private, peer_public, crypto.pair_info(run_id, number, "pairwise-mask", me, other))


def revealed(rnd: SecureRound) -> dict[str, dict[str, dict[str, str]]]:
    """holder -> {"seed_shares": {of: share}, "key_shares": {of: share}} as kept (base64)."""
    return {m.client_id: m.body for m in rnd.state.list_secagg_messages(rnd.run_id, rnd.number, REVEAL)}


def _rebuild(rnd: SecureRound, of: str, kind: str, reveals: Mapping[str, Mapping[str, Mapping[str, str]]]) -> bytes:
    field = "seed_shares" if kind == "seed" else "key_shares"
    shares = [(rnd.index(holder, of), base64.b64decode(body[field][of]))
              for holder, body in reveals.items() if of in body.get(field, {})]
    if len(shares) < rnd.threshold:
        what = "self-mask seed" if kind == "seed" else "masking key"
        raise UnmaskError(f"client {of}'s {what} needs {rnd.threshold} shares and {len(shares)} were revealed: too "
                          "many of its neighbours left before the unmask phase, so the sum cannot be unmasked")
    return shamir.combine(sorted(shares), rnd.threshold)


def missing_secrets(rnd: SecureRound, reveals: Mapping[str, Mapping[str, Mapping[str, str]]]) -> list[str]:
    """The secrets the sum needs that the reveals so far cannot rebuild, as "client (seed|key)";
    empty once the round can be unmasked."""
    counts: dict[tuple[str, str], int] = {}
    for body in reveals.values():
        for field, kind in (("seed_shares", "seed"), ("key_shares", "key")):
            for of in body.get(field, {}):
                counts[of, kind] = counts.get((of, kind), 0) + 1
    uploaded = set(rnd.uploaders)
    needed = [(c, "seed") for c in sorted(uploaded)]
    needed += [(d, "key") for d in sorted(set(rnd.dealers) - uploaded)
               if any(c in uploaded for c in rnd.graph.get(d, []))]
    return [f"{c} ({kind})" for c, kind in needed if counts.get((c, kind), 0) < rnd.threshold]


def unmask(rnd: SecureRound, updates: Sequence[MaskedUpdate], layout: Layout, frac_bits: int, clip: float) -> Unmasked:
    length = size_of(layout)
    reveals = revealed(rnd)
    uploaded = {u.client_id for u in updates}
    total = np.zeros(length, dtype=np.uint64)
    for upd in updates:
        total += upd.flat
    for client in sorted(uploaded):
        total -= crypto.mask(_rebuild(rnd, client, "seed", reveals), length)
    dealt = set(rnd.dealers)
    rebuilt_keys = 0
    for dropped in sorted(dealt - uploaded):
        partners = [c for c in rnd.graph.get(dropped, []) if c in uploaded]
        if not partners:
            continue  # no uploader masked against it: nothing of its is in the sum
        private = _rebuild(rnd, dropped, "key", reveals)
        advertised = base64.b64decode(rnd.keys[dropped][1])
        if crypto.public_key(private) != advertised:
            raise UnmaskError(f"client {dropped}'s rebuilt masking key does not match the key it advertised")
        rebuilt_keys += 1
        for partner in partners:
            seed = pair_seed(private, base64.b64decode(rnd.keys[partner][1]), rnd.run_id, rnd.number, partner,
                             dropped)
            stream = crypto.mask(seed, length)
            # The partner added sign * mask; take it away again.
            total -= stream if pair_sign(partner, dropped) > 0 else (np.uint64(0) - stream)
    weight = sum(u.weight for u in updates)
    mean = dequantize(total, weight, frac_bits)
    out_of_range = int(np.count_nonzero(np.abs(mean) > clip))
    return Unmasked(mean=np.clip(mean, -clip, clip), total_weight=weight, out_of_range=out_of_range,
                    rebuilt_seeds=len(uploaded), rebuilt_keys=rebuilt_keys)
