"""The messages of secure aggregation on the REST API (under
/v1/runs/{run}/rounds/{n}/secagg). Keys, ciphertexts and shares travel as base64; every field is
bounded, so a body is checked before anything is kept."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from common.secagg.crypto import KEY_BYTES, NONCE_BYTES, SEED_BYTES

# Fixed shapes: a share is two 16-byte halves of a 32-byte secret at most; a ciphertext holds
# the share plaintext (see edge_sdk/secagg.py) plus nonce and tag, with room for ids.
MAX_SHARE_BYTES = 2 * SEED_BYTES
MAX_CIPHERTEXT_BYTES = 1024
MAX_NEIGHBOURS = 256
CLIENT_ID = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


def _b64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def _sized(low: int, high: int):
    def check(raw: bytes) -> bytes:
        if not low <= len(raw) <= high:
            want = f"{low}" if low == high else f"{low} to {high}"
            raise ValueError(f"must decode to {want} bytes, got {len(raw)}")
        return raw
    return check


def _b64_field(low: int, high: int):
    return Annotated[bytes, BeforeValidator(lambda v: _sized(low, high)(_b64(v))),
                     PlainSerializer(lambda b: base64.b64encode(b).decode(), return_type=str)]


PublicKey = _b64_field(KEY_BYTES, KEY_BYTES)
Ciphertext = _b64_field(NONCE_BYTES + 16, MAX_CIPHERTEXT_BYTES)
Share = _b64_field(SEED_BYTES, MAX_SHARE_BYTES)
ClientId = Annotated[str, CLIENT_ID]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyAdvert(_Strict):
    """Phase `keys`: a device's two public keys for the round: `encryption` (shares in transit)
    and `masking` (pairwise masks)."""

    encryption: PublicKey
    masking: PublicKey


class NeighbourKeys(_Strict):
    client_id: ClientId
    index: int = Field(ge=1, description="this neighbour's share index in the device's dealing (1-based)")
    encryption: PublicKey
    masking: PublicKey


class Neighbourhood(BaseModel):
    """Phase `shares` onward: the device's neighbours and the sharing threshold."""

    members: int = Field(description="clients that advertised keys this round")
    threshold: int
    neighbours: list[NeighbourKeys]


class DealtShare(_Strict):
    to: ClientId
    ciphertext: Ciphertext
    seed_commitment: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_commitment: str = Field(pattern=r"^[0-9a-f]{64}$")


class ShareBundle(_Strict):
    """Phase `shares`: one encrypted share for every neighbour, none for anyone else, and the
    commitment to the seed share the device keeps (index k + 1), which it reveals itself."""

    shares: list[DealtShare] = Field(max_length=MAX_NEIGHBOURS)
    own_seed_commitment: str = Field(pattern=r"^[0-9a-f]{64}$")


class ReceivedShare(BaseModel):
    sender: str
    ciphertext: Ciphertext


class Inbox(BaseModel):
    """Phase `collecting` onward: the neighbours that dealt shares (the device masks with these
    only) and the shares they dealt to this device."""

    dealers: list[str]
    shares: list[ReceivedShare]


class UnmaskRequest(BaseModel):
    """Phase `unmasking`: of this device's neighbours that dealt shares, which uploaded (reveal
    their self-mask seed shares) and which did not (reveal their masking key shares)."""

    uploaded: list[str]
    dropped: list[str]


class Reveal(_Strict):
    """The device's answer: exactly one share per neighbour named in the request, of the seed
    for those that uploaded and of the masking key for those that dropped, and the share of its
    own seed it kept."""

    seed_shares: dict[ClientId, Share] = Field(default_factory=dict, max_length=MAX_NEIGHBOURS)
    key_shares: dict[ClientId, Share] = Field(default_factory=dict, max_length=MAX_NEIGHBOURS)
