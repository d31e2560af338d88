"""The coordinator's side of secure aggregation (ARCHITECTURE.md, "Secure aggregation"): which
runs may use it (spec.py), the membership of each phase (phases.py) and the unmasking of the sum
(unmask.py). The REST side is cloud/services/secagg.py and cloud/api/secagg.py."""
