"""The cryptographic primitives of secure aggregation, all from `cryptography`: X25519 key
agreement, HKDF-SHA256 key derivation, AES-GCM for shares in transit and AES-CTR as the keyed
PRG that expands a 16-byte seed into a mask over Z_2^64.

Every derived key is bound to the run, the round and the two parties (HKDF `info`), so a key,
a ciphertext or a mask from one round is useless in another.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

KEY_BYTES = 32  # X25519 public and private keys
SEED_BYTES = 16  # self-mask seeds and derived PRG keys: AES-128
NONCE_BYTES = 12


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def context(run_id: str, round_number: int, *parts: str) -> bytes:
    """What a derived key is bound to: run, round and the parties, unambiguously joined."""
    return "\x1f".join(["cotune-secagg-v1", run_id, str(round_number), *parts]).encode()


def agree(private: bytes, peer_public: bytes, info: bytes, length: int = SEED_BYTES) -> bytes:
    """X25519 between our private key and the peer's public key, through HKDF-SHA256."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)


def pair_info(run_id: str, round_number: int, purpose: str, a: str, b: str) -> bytes:
    """The HKDF context of a key two clients share: the same whichever of them derives it."""
    low, high = sorted((a, b))
    return context(run_id, round_number, purpose, low, high)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM with a random nonce, which leads the ciphertext."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Raises cryptography's InvalidTag if the ciphertext or its context was altered."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


def mask(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random elements of Z_2^64 from a 16-byte seed: the AES-128-CTR keystream.

    A keyed PRG, not numpy's generators: those are fast but not cryptographic, and a mask must
    be unpredictable to anyone without the seed."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").copy()


def commitment(run_id: str, round_number: int, kind: str, sender: str, recipient: str, index: int,
               share: bytes) -> str:
    """SHA-256 over one share and everything it belongs to. The dealer publishes it with the
    encrypted share, so the coordinator can tell a wrong or replayed share at reveal time; a
    share is 16 uniform bytes, so the digest gives nothing away."""
    body = context(run_id, round_number, "share", kind, sender, recipient, str(index)) + b"\x1f" + share
    return hashlib.sha256(body).hexdigest()
