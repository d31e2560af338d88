"""Who is in each phase of a secure-aggregation round, read from the state.

SecAgg+ names the sets U1 (advertised keys), U2 (dealt shares) and U3 (uploaded a masked
update). Each is final once the round has left its phase: the state takes a phase's messages
only while the round is in it (`CoordinatorState.put_secagg_message`, `insert_update`). The
neighbour graph is a function of U1 and a public seed, so every party computes the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from cloud.state import CoordinatorState
from common.protocol import RoundState, SecureAggregationSpec
from common.secagg.graph import default_degree, default_threshold, neighbours

KEYS, SHARES, REVEAL = "keys", "shares", "reveal"

# The order a secure round's states come in; "has the round reached X" compares positions here.
ORDER = (RoundState.open, RoundState.keys, RoundState.shares, RoundState.collecting, RoundState.unmasking,
         RoundState.aggregating, RoundState.server_step, RoundState.publishing, RoundState.closed)


def reached(state: RoundState, phase: RoundState) -> bool:
    """Whether a round in `state` has entered `phase` (a failed round has reached nothing)."""
    return state in ORDER and ORDER.index(state) >= ORDER.index(phase)


@dataclass
class SecureRound:
    state: CoordinatorState
    run_id: str
    number: int
    seed: int
    settings: SecureAggregationSpec

    @cached_property
    def keys(self) -> dict[str, tuple[str, str]]:
        """U1: client -> (encryption key, masking key), base64, in the order they came."""
        return {m.client_id: (m.body["encryption"], m.body["masking"])
                for m in self.state.list_secagg_messages(self.run_id, self.number, KEYS)}

    @property
    def members(self) -> list[str]:
        return list(self.keys)

    @cached_property
    def degree(self) -> int:
        n = len(self.keys)
        wanted = self.settings.neighbours if self.settings.neighbours is not None else default_degree(n)
        return min(wanted, n - 1) if n > 1 else 0

    @cached_property
    def graph(self) -> dict[str, list[str]]:
        return neighbours(self.members, self.degree, f"{self.run_id}\x1f{self.number}\x1f{self.seed}")

    @cached_property
    def threshold(self) -> int:
        # A device's secrets have k + 1 holders: its k neighbours and itself (Bonawitz et al. keep
        # a share with the dealer too, so a round completes while t devices remain).
        return default_threshold(self.degree + 1, self.settings.threshold_fraction)

    @cached_property
    def dealers(self) -> list[str]:
        """U2, in the order their shares came."""
        return [m.client_id for m in self.state.list_secagg_messages(self.run_id, self.number, SHARES)]

    @cached_property
    def uploaders(self) -> list[str]:
        """U3, in the order the updates were accepted."""
        return [u.client_id for u in self.state.list_updates(self.run_id, self.number)]

    def index(self, holder: str, of: str) -> int:
        """The 1-based share index `holder` has in `of`'s dealing: its place among `of`'s neighbours,
        or k + 1 for the share `of` keeps itself."""
        near = self.graph[of]
        return len(near) + 1 if holder == of else near.index(holder) + 1

    @cached_property
    def own_commitments(self) -> dict[str, str]:
        """dealer -> commitment to the seed share it kept itself (revealed once it uploaded)."""
        return {m.client_id: m.body["own_seed_commitment"]
                for m in self.state.list_secagg_messages(self.run_id, self.number, SHARES)}

    def unmask_request(self, client: str) -> tuple[list[str], list[str]]:
        """(uploaded, dropped): the client's neighbours that dealt shares, split by whether they
        uploaded; it reveals seed shares of the first and masking-key shares of the second."""
        dealers, uploaded = set(self.dealers), set(self.uploaders)
        near = [c for c in self.graph.get(client, []) if c in dealers]
        return [c for c in near if c in uploaded], [c for c in near if c not in uploaded]
