"""Secure aggregation over REST (ARCHITECTURE.md, "Secure aggregation"): a device's public keys,
the shares it deals, what it may read of its neighbours' (their keys, the shares dealt to it, the
unmask request) and the shares it reveals; and the check that a masked upload comes from a
device whose shares are in the round.

Every message is checked in full before it is kept, once per device and phase, while the round
is in that phase; a refused one changes nothing. A client only ever reads what concerns it: its
neighbours' public keys, and ciphertexts dealt to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict

from pydantic import BaseModel

from cloud.errors import ApiError, forbidden
from cloud.secure.phases import KEYS, REVEAL, SHARES, SecureRound, reached
from cloud.services.auth import check_member
from cloud.services.runs import RunsService
from cloud.state import CoordinatorState
from cloud.state.records import ClientRecord, RoundRecord, RunRecord, SecaggMessage, SecaggShare, UpdateOutcome
from common.protocol import RoundState, RunSpec, RunState
from common.secagg import crypto
from common.secagg.wire import (
    Inbox,
    KeyAdvert,
    Neighbourhood,
    NeighbourKeys,
    ReceivedShare,
    Reveal,
    ShareBundle,
    UnmaskRequest,
)


def _digest(body: BaseModel) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _answer(outcome: UpdateOutcome, what: str, number: int, state: RoundState) -> bool:
    """True for a new message, False for a resent one; ApiError for the refusals."""
    if outcome is UpdateOutcome.accepted:
        return True
    if outcome is UpdateOutcome.duplicate:
        return False
    if outcome is UpdateOutcome.conflict:
        raise ApiError(409, "secagg_conflict", f"this client already sent different {what} in round {number}",
                       "a device sends one message per phase; one that lost its round state drops out of the round")
    if outcome is UpdateOutcome.reused:
        raise ApiError(409, "secagg_key_reused", "a public key advertised here was advertised before",
                       "make fresh keys for every round; a replayed key is never taken")
    raise _wrong_phase(number, state, what)


def _wrong_phase(number: int, state: RoundState, what: str) -> ApiError:
    return ApiError(409, "secagg_wrong_phase", f"round {number} is {state.value}; it does not take {what} now",
                    "fetch the current round and do what its state asks")


class SecaggService:
    def __init__(self, state: CoordinatorState, runs: RunsService) -> None:
        self.state = state
        self.runs = runs
        # Membership read once per round and state: each set is final once its phase is over, and
        # in a given state the endpoints read only sets whose phase is over. Bounded: recent rounds.
        self._rounds: OrderedDict[tuple[str, int, RoundState], SecureRound] = OrderedDict()

    def _secure_round(self, run: RunRecord, rnd: RoundRecord) -> SecureRound:
        key = (run.id, rnd.number, rnd.state)
        found = self._rounds.get(key)
        if found is None:
            spec = RunSpec.model_validate(run.spec)
            if spec.secure_aggregation is None:
                raise ApiError(409, "secagg_off", f"run {run.name!r} does not use secure aggregation",
                               "upload the update as it is (PUT .../updates/{client_id})")
            found = self._rounds[key] = SecureRound(self.state, run.id, rnd.number, spec.seed,
                                                    spec.secure_aggregation)
            while len(self._rounds) > 64:
                self._rounds.popitem(last=False)
        return found

    # -- helpers -----------------------------------------------------------------------------

    def _round(self, client: ClientRecord, run_id: str, number: int,
               client_id: str | None = None) -> tuple[RunRecord, RoundRecord, SecureRound]:
        check_member(client, run_id, "this client is not enrolled in that run")
        if client_id is not None and client_id != client.id:
            raise forbidden("a client may only send its own secure-aggregation messages",
                            "use the client id your enrollment returned")
        run = self.runs.get(run_id)
        rnd = self.state.get_round(run_id, number)
        if rnd is None:
            raise ApiError(404, "not_found", f"round {number} does not exist")
        return run, rnd, self._secure_round(run, rnd)

    @staticmethod
    def _running(run: RunRecord, rnd: RoundRecord, phase: RoundState, what: str) -> None:
        if run.state != RunState.running or rnd.state != phase:
            raise _wrong_phase(rnd.number, rnd.state, what)

    @staticmethod
    def _reached(rnd: RoundRecord, phase: RoundState, what: str) -> None:
        if not reached(rnd.state, phase):
            raise ApiError(409, "secagg_not_yet", f"round {rnd.number} is {rnd.state.value}; {what} is known once "
                           f"it reaches {phase.value}", "poll the current round and ask again then")

    # -- phase keys --------------------------------------------------------------------------

    def advertise(self, client: ClientRecord, run_id: str, number: int, client_id: str, advert: KeyAdvert) -> bool:
        run, rnd, _sec = self._round(client, run_id, number, client_id)
        self._running(run, rnd, RoundState.keys, "public keys")
        if advert.encryption == advert.masking:
            raise ApiError(422, "secagg_bad_keys", "the encryption and masking keys are the same key",
                           "make two key pairs")
        keys = [advert.encryption.hex(), advert.masking.hex()]
        message = SecaggMessage(run_id, number, client.id, KEYS, advert.model_dump(mode="json"), _digest(advert))
        return _answer(self.state.put_secagg_message(message, RoundState.keys, public_keys=keys), "keys", number,
                       rnd.state)

    # -- phase shares ------------------------------------------------------------------------

    def neighbourhood(self, client: ClientRecord, run_id: str, number: int) -> Neighbourhood:
        _run, rnd, sec = self._round(client, run_id, number)
        self._reached(rnd, RoundState.shares, "the neighbourhood")
        if client.id not in sec.keys:
            raise _not_member(number, "advertised no keys")
        hood = []
        for peer in sec.graph[client.id]:
            enc, mask = sec.keys[peer]
            hood.append(NeighbourKeys(client_id=peer, index=sec.graph[client.id].index(peer) + 1,
                                      encryption=enc, masking=mask))
        return Neighbourhood(members=len(sec.members), threshold=sec.threshold, neighbours=hood)

    def deal(self, client: ClientRecord, run_id: str, number: int, client_id: str, bundle: ShareBundle) -> bool:
        run, rnd, sec = self._round(client, run_id, number, client_id)
        self._running(run, rnd, RoundState.shares, "shares")
        if client.id not in sec.keys:
            raise _not_member(number, "advertised no keys")
        wanted = sec.graph[client.id]
        got = [s.to for s in bundle.shares]
        if sorted(got) != wanted:
            raise ApiError(422, "secagg_bad_shares", f"the bundle deals to {len(got)} clients; it must deal exactly "
                           f"one share to each of this client's {len(wanted)} neighbours",
                           "deal to the neighbours GET .../secagg/neighbourhood lists")
        rows = [SecaggShare(sender=client.id, recipient=s.to, ciphertext=base64.b64encode(s.ciphertext).decode(),
                            seed_commitment=s.seed_commitment, key_commitment=s.key_commitment)
                for s in bundle.shares]
        body = {"to": got, "own_seed_commitment": bundle.own_seed_commitment}
        message = SecaggMessage(run_id, number, client.id, SHARES, body, _digest(bundle))
        return _answer(self.state.put_secagg_message(message, RoundState.shares, shares=rows), "shares", number,
                       rnd.state)

    # -- phase collecting --------------------------------------------------------------------

    def inbox(self, client: ClientRecord, run_id: str, number: int) -> Inbox:
        _run, rnd, sec = self._round(client, run_id, number)
        self._reached(rnd, RoundState.collecting, "the inbox")
        dealers = set(sec.dealers)
        if client.id not in dealers:
            raise _not_member(number, "dealt no shares")
        near = [c for c in sec.graph[client.id] if c in dealers]
        shares = [ReceivedShare(sender=s.sender, ciphertext=s.ciphertext)
                  for s in self.state.secagg_shares_for(run_id, number, client.id) if s.sender in dealers]
        return Inbox(dealers=near, shares=shares)

    def check_masked_upload(self, client: ClientRecord, run: RunRecord, rnd: RoundRecord) -> None:
        """A masked update is taken only in `collecting`, from a client whose shares are in."""
        if rnd.state != RoundState.collecting:
            raise _wrong_phase(rnd.number, rnd.state, "masked updates")
        if client.id not in self._secure_round(run, rnd).dealers:
            raise _not_member(rnd.number, "dealt no shares")

    # -- phase unmasking ---------------------------------------------------------------------

    def unmask_request(self, client: ClientRecord, run_id: str, number: int) -> UnmaskRequest:
        _run, rnd, sec = self._round(client, run_id, number)
        self._reached(rnd, RoundState.unmasking, "the unmask request")
        if client.id not in sec.uploaders:
            raise _not_member(number, "uploaded no masked update")
        uploaded, dropped = sec.unmask_request(client.id)
        return UnmaskRequest(uploaded=uploaded, dropped=dropped)

    def reveal(self, client: ClientRecord, run_id: str, number: int, client_id: str, reveal: Reveal) -> bool:
        run, rnd, sec = self._round(client, run_id, number, client_id)
        self._running(run, rnd, RoundState.unmasking, "revealed shares")
        if client.id not in sec.uploaders:
            raise _not_member(number, "uploaded no masked update")
        uploaded, dropped = sec.unmask_request(client.id)
        if sorted(reveal.seed_shares) != sorted([*uploaded, client.id]) or sorted(reveal.key_shares) != sorted(dropped):
            raise ApiError(422, "secagg_bad_reveal", "the reveal must hold a seed share for exactly this client and "
                           "the neighbours that uploaded, and a masking-key share for exactly those that dropped",
                           "answer the sets GET .../secagg/unmask lists")
        dealt = {s.sender: s for s in self.state.secagg_shares_for(run_id, number, client.id)}
        self._check_shares(run_id, number, client.id, sec, "seed", reveal.seed_shares, dealt)
        self._check_shares(run_id, number, client.id, sec, "key", reveal.key_shares, dealt)
        message = SecaggMessage(run_id, number, client.id, REVEAL, reveal.model_dump(mode="json"), _digest(reveal))
        return _answer(self.state.put_secagg_message(message, RoundState.unmasking), "revealed shares", number,
                       rnd.state)

    @staticmethod
    def _check_shares(run_id: str, number: int, holder: str, sec: SecureRound, kind: str,
                      shares: dict[str, bytes], dealt: dict[str, SecaggShare]) -> None:
        for sender, share in shares.items():
            row = dealt.get(sender)
            if sender == holder:  # the seed share the dealer kept itself
                expected = sec.own_commitments.get(holder) if kind == "seed" else None
            else:
                expected = None if row is None else (row.seed_commitment if kind == "seed" else row.key_commitment)
            got = crypto.commitment(run_id, number, kind, sender, holder, sec.index(holder, sender), share)
            if got != expected:
                raise ApiError(422, "secagg_bad_share", f"the {kind} share of {sender} is not the one {sender} dealt "
                               "to this client", "reveal the shares exactly as they were received")


def _not_member(number: int, why: str) -> ApiError:
    return ApiError(409, "secagg_not_in_round", f"this client {why} in round {number}, so it is not part of the "
                    "round's secure aggregation", "wait for the next round")

