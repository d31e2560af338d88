"""Secure aggregation in the SecAgg+ family (Bell et al., CCS 2020; ARCHITECTURE.md, "Secure
aggregation"): what the devices and the coordinator both need.

Per round, each device advertises two X25519 public keys, Shamir-shares its self-mask seed and
its masking key among its neighbours in a random sparse graph (shares travel AES-GCM encrypted,
device to device through the coordinator), uploads its update quantised to the ring Z_2^64 plus
its self mask and one pairwise mask per neighbour, and finally reveals, for each neighbour, the
share the coordinator needs: of the self-mask seed for a neighbour that uploaded, of the masking
key for one that dropped, never both. The coordinator then learns the sum of the uploads only.

- crypto.py: key agreement, the keyed PRG, share encryption and commitments (`cryptography`);
- shamir.py: threshold sharing of 16- and 32-byte secrets (`pycryptodome`);
- ring.py: fixed-point quantisation to Z_2^64 and back, and its error bound;
- graph.py: the neighbour graph (a Harary graph on a seeded permutation);
- wire.py: the messages on the REST API.
"""
