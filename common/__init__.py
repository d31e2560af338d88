"""cotune's ground floor: what the device, the exporter and the coordinator all share (wire
protocol, method contracts, tensor files, manifests, digests, checkpoints, retry, records,
metrics, the training code both sides run). It imports no other cotune package
(ARCHITECTURE.md, "Layers")."""

__version__ = "0.1.0"
