"""cotune's ground floor: what the device, the exporter and the coordinator all share
(wire protocol, tensor files, manifests, retry, records, metrics, the training code both
sides run). It imports nothing from edge_sdk, export, cloud or cotune (ARCHITECTURE.md)."""

__version__ = "0.1.0"
