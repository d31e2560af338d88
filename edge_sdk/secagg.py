"""A device's side of one secure-aggregation round (ARCHITECTURE.md, "Secure aggregation").

The round's secrets (two X25519 private keys and the self-mask seed) are made once and kept in a
private file in the device's state directory, so a device that restarts mid-round goes on with
the same keys instead of contradicting what it already sent. What the device has revealed is
kept there too: it never reveals, for one neighbour, both the seed share and the masking-key
share, whatever the coordinator asks, since together they would unmask that neighbour's update.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.private_file import write_private
from common.protocol import SecureAggregationTask
from common.secagg import crypto, shamir
from common.secagg.graph import default_threshold
from common.secagg.ring import Layout, quantize, unflatten
from common.secagg.wire import DealtShare, Inbox, KeyAdvert, Neighbourhood, Reveal, ShareBundle, UnmaskRequest


def check_secagg_install() -> None:
    """ImportError, naming the module, when this install lacks secure aggregation's libraries."""
    import cryptography  # noqa: F401
    from Crypto.Protocol import SecretSharing  # noqa: F401


class SecureAggregationRefused(RuntimeError):
    """The coordinator asked for something an honest device must not do; the message says what."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _raw(text: str) -> bytes:
    return base64.b64decode(text)


def pair_sign(me: str, other: str) -> int:
    # The same rule as the coordinator's (cloud/secure/unmask.py): the smaller id adds the mask.
    return 1 if me < other else -1


class SecureSession:
    """One device, one round. Every step is idempotent: called again after a restart it
    returns what it returned before."""

    def __init__(self, path: Path, run_id: str, number: int, client_id: str, task: SecureAggregationTask) -> None:
        self.path = Path(path)
        self.run_id, self.number, self.client_id, self.task = run_id, number, client_id, task
        if self.path.exists():
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        else:
            self.data = {"encryption_key": _b64(crypto.new_private_key()),
                         "masking_key": _b64(crypto.new_private_key()), "seed": _b64(crypto.new_seed())}
            self._save()

    def _save(self) -> None:
        write_private(self.path, json.dumps(self.data))

    @property
    def _enc(self) -> bytes:
        return _raw(self.data["encryption_key"])

    @property
    def _mask_key(self) -> bytes:
        return _raw(self.data["masking_key"])

    def _aad(self, sender: str, recipient: str) -> bytes:
        return crypto.context(self.run_id, self.number, "share", sender, recipient)

    def _share_key(self, peer_encryption: bytes, peer: str) -> bytes:
        info = crypto.pair_info(self.run_id, self.number, "share-encryption", self.client_id, peer)
        return crypto.agree(self._enc, peer_encryption, info, length=32)

    # -- phase keys ------------------------------------------------------------------------

    def advert(self) -> KeyAdvert:
        return KeyAdvert(encryption=crypto.public_key(self._enc), masking=crypto.public_key(self._mask_key))

    # -- phase shares ----------------------------------------------------------------------

    def deal(self, hood: Neighbourhood) -> ShareBundle:
        """Share the seed and the masking key among the neighbours, each share encrypted for its
        holder. Refuses a neighbourhood whose threshold is weaker than the run's."""
        if "dealt" in self.data:
            return ShareBundle.model_validate(self.data["dealt"])
        ids = [n.client_id for n in hood.neighbours]
        if len(set(ids)) != len(ids) or self.client_id in ids:
            raise SecureAggregationRefused("the coordinator listed a neighbour twice, or this device as its own")
        if not ids:
            raise SecureAggregationRefused("the coordinator gave this device no neighbours to share its secrets with")
        # k neighbours and this device hold shares: it keeps the last one (index k + 1).
        expected = default_threshold(len(ids) + 1, self.task.threshold_fraction)
        if hood.threshold != expected:
            raise SecureAggregationRefused(
                f"the coordinator set the sharing threshold to {hood.threshold} for {len(ids)} neighbours; the run's "
                f"threshold fraction {self.task.threshold_fraction} makes it {expected}")
        order = sorted(ids)
        seed_shares = shamir.split(_raw(self.data["seed"]), hood.threshold, len(order) + 1)
        key_shares = shamir.split(self._mask_key, hood.threshold, len(order) + 1)
        own_index = len(order) + 1
        dealt = []
        peers = {}
        for n in hood.neighbours:
            index = order.index(n.client_id) + 1
            if n.index != index:
                raise SecureAggregationRefused(f"the coordinator gave neighbour {n.client_id} index {n.index}; "
                                               f"its place among this device's neighbours is {index}")
            seed, key = seed_shares[index - 1], key_shares[index - 1]
            plain = json.dumps({"from": self.client_id, "to": n.client_id, "index": index,
                                "seed": _b64(seed), "key": _b64(key)}).encode()
            blob = crypto.encrypt(self._share_key(n.encryption, n.client_id), plain, self._aad(self.client_id,
                                                                                               n.client_id))
            commit = lambda kind, share, n=n, index=index: crypto.commitment(  # noqa: E731
                self.run_id, self.number, kind, self.client_id, n.client_id, index, share)
            dealt.append(DealtShare(to=n.client_id, ciphertext=blob, seed_commitment=commit("seed", seed),
                                    key_commitment=commit("key", key)))
            peers[n.client_id] = {"encryption": _b64(n.encryption), "masking": _b64(n.masking)}
        own = seed_shares[own_index - 1]
        bundle = ShareBundle(shares=dealt, own_seed_commitment=crypto.commitment(
            self.run_id, self.number, "seed", self.client_id, self.client_id, own_index, own))
        self.data["own_seed_share"] = _b64(own)
        self.data["neighbours"] = peers
        self.data["dealt"] = bundle.model_dump(mode="json")
        self._save()
        return bundle

    # -- phase collecting ------------------------------------------------------------------

    def _receive(self, inbox: Inbox) -> list[str]:
        """Decrypt and keep the shares dealt to this device; the neighbours to mask against."""
        peers: Mapping[str, Any] = self.data.get("neighbours", {})
        dealers = [d for d in inbox.dealers if d in peers]
        received = {}
        for item in inbox.shares:
            if item.sender not in peers:
                raise SecureAggregationRefused(f"a share from {item.sender}, who is not this device's neighbour")
            key = self._share_key(_raw(peers[item.sender]["encryption"]), item.sender)
            try:
                plain = json.loads(crypto.decrypt(key, item.ciphertext, self._aad(item.sender, self.client_id)))
            except Exception:
                raise SecureAggregationRefused(f"the share from {item.sender} does not decrypt: it was altered or "
                                               "is not meant for this device") from None
            if plain.get("from") != item.sender or plain.get("to") != self.client_id:
                raise SecureAggregationRefused(f"the share from {item.sender} names other parties")
            received[item.sender] = {"index": plain["index"], "seed": plain["seed"], "key": plain["key"]}
        missing = [d for d in dealers if d not in received]
        if missing:
            raise SecureAggregationRefused(f"no share from dealers {missing[:5]} reached this device")
        self.data["dealers"] = dealers
        self.data["received"] = received
        self._save()
        return dealers

    def masked(self, arrays: Mapping[str, np.ndarray], layout: Layout, weight: int,
               inbox: Inbox) -> tuple[dict[str, np.ndarray], int]:
        """The update quantised, weighted and masked, as int64 tensors of the adapter's names and
        shapes; and how many values the clip range cut."""
        dealers = self._receive(inbox)
        flat, clipped = quantize(arrays, layout, min(weight, self.task.weight_cap), self.task.clip,
                                 self.task.fraction_bits)
        flat = flat + crypto.mask(_raw(self.data["seed"]), flat.size)
        info = self.data["neighbours"]
        for peer in dealers:
            info_bytes = crypto.pair_info(self.run_id, self.number, "pairwise-mask", self.client_id, peer)
            stream = crypto.mask(crypto.agree(self._mask_key, _raw(info[peer]["masking"]), info_bytes), flat.size)
            flat = flat + stream if pair_sign(self.client_id, peer) > 0 else flat - stream
        return unflatten(flat.view(np.int64), layout, np.int64), clipped

    # -- phase unmasking -------------------------------------------------------------------

    def reveal(self, request: UnmaskRequest) -> Reveal:
        """The shares the coordinator needs: seeds of the neighbours that uploaded, masking keys
        of those that dropped. Refuses a request that would reveal both of one neighbour, now or
        together with an earlier answer."""
        uploaded, dropped = set(request.uploaded), set(request.dropped)
        if uploaded & dropped:
            both = sorted(uploaded & dropped)[:5]
            raise SecureAggregationRefused(f"the coordinator asked for both secrets of {both}")
        before = self.data.get("revealed")
        if before is not None and before != {"uploaded": sorted(uploaded), "dropped": sorted(dropped)}:
            raise SecureAggregationRefused("the coordinator asked again with other sets of neighbours; this "
                                           "device answers one unmask request per round")
        received = self.data.get("received", {})
        unknown = (uploaded | dropped) - set(received)
        if unknown:
            raise SecureAggregationRefused(f"the coordinator asked about {sorted(unknown)[:5]}, whose shares this "
                                           "device does not hold")
        self.data["revealed"] = {"uploaded": sorted(uploaded), "dropped": sorted(dropped)}
        self._save()
        seeds = {c: _raw(received[c]["seed"]) for c in sorted(uploaded)}
        seeds[self.client_id] = _raw(self.data["own_seed_share"])  # it uploaded: its own seed is asked for
        return Reveal(seed_shares=seeds, key_shares={c: _raw(received[c]["key"]) for c in sorted(dropped)})
