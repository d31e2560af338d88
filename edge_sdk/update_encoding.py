"""The run's update encoding applied on the device (common/encoding.py): after the handler's
work and local DP, before the upload is written. Used by the join loop and by anything that
drives handlers in process (benchmarks, simulation), so both encode alike."""

from __future__ import annotations

import numpy as np

from common.protocol import RoundInfo
from edge_sdk.handlers.base import Fetcher, UpdatePayload, artifact


def encode_payload(payload: UpdatePayload, info: RoundInfo, cache: Fetcher) -> UpdatePayload:
    """`payload` under the round's update encoding; unchanged for fp32."""
    encoding = info.task.update_encoding
    if encoding == "fp32":
        return payload
    from common.encoding import encode
    from common.ml.lora import frozen_factor
    from common.tensorfile import load_arrays

    base_name = info.task.update_base

    def frozen(name: str) -> bool:  # frozen factors of an adapter travel as they are
        return base_name is not None and frozen_factor(name, info.task.lora.aggregation)

    if base_name is None:  # uploads that are not an adapter (scores): the change from zero
        start = {k: np.zeros(np.shape(v), np.float32) for k, v in payload.arrays.items()}
    else:
        start = load_arrays(cache.fetch(artifact(info, base_name)))
    return UpdatePayload(arrays=encode(payload.arrays, start, encoding, frozen), num_samples=payload.num_samples,
                         metrics=payload.metrics)
