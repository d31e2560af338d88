"""Threshold sharing of the secrets a device deals to its neighbours: `pycryptodome`'s Shamir
scheme over GF(2^128), which shares 16-byte secrets. A 32-byte secret (an X25519 private key)
goes as two 16-byte halves shared with the same indexes, so one share is 32 bytes."""

from __future__ import annotations

from collections.abc import Sequence

HALF = 16


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` shares of a 16- or 32-byte secret, any `threshold` of which rebuild it; share k
    (0-based) has index k + 1."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) not in (HALF, 2 * HALF):
        raise ValueError(f"shares secrets of {HALF} or {2 * HALF} bytes, got {len(secret)}")
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold {threshold} must be between 1 and the {count} shares")
    halves = [Shamir.split(threshold, count, secret[i:i + HALF]) for i in range(0, len(secret), HALF)]
    return [b"".join(half[k][1] for half in halves) for k in range(count)]


def combine(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least `threshold` (index, share) pairs; indexes are 1-based. Only the
    first `threshold` are used: every share the coordinator combines was checked against its
    commitment, so any `threshold` of them agree."""
    from Crypto.Protocol.SecretSharing import Shamir

    chosen = list(shares)[:threshold]
    if len(chosen) < threshold:
        raise ValueError(f"{len(chosen)} shares cannot rebuild a secret that needs {threshold}")
    size = len(chosen[0][1])
    if size not in (HALF, 2 * HALF) or any(len(s) != size for _, s in chosen):
        raise ValueError("shares of one secret all have 16 or all have 32 bytes")
    return b"".join(Shamir.combine([(i, s[o:o + HALF]) for i, s in chosen]) for o in range(0, size, HALF))
