"""A LoRA adapter as a GGUF LoRA file that llama.cpp applies on top of the base GGUF.

Each adapted linear layer W (out x in) becomes `<gguf name>.lora_a` (r x in) and
`<gguf name>.lora_b` (out x r); llama.cpp adds scale * alpha / r * B @ A @ x. For llama, B's
rows get the same rotary reordering as the base q/k weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from export.errors import UnsupportedModelError
from export.gguf_writer import arch_spec, gguf_name_map, gguf_tensor_name, rope_rows
from export.merge import LoraPair


def write_gguf_lora(pairs: list[LoraPair], config: Any, path: str | os.PathLike[str], *,
                    name: str = "cotune-lora") -> Path:
    """Write the adapter; alpha is stored when every layer has the same alpha, else folded into B."""
    import gguf
    import numpy as np

    if not pairs:
        raise UnsupportedModelError("the adapter has no LoRA layers to write")
    spec = arch_spec(config)
    name_map = gguf_name_map(config)
    alphas = {round(p.scaling * p.a.shape[0], 6) for p in pairs}
    uniform = len(alphas) == 1
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / r; alpha 0 means "use B as stored" (scales already folded in).
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()) if uniform else 0.0)
    for pair in pairs:
        target = gguf_tensor_name(name_map, pair.module + ".weight")
        b = pair.b if uniform else pair.b * pair.scaling
        if spec.permute_qk and (pair.module.endswith("self_attn.q_proj") or pair.module.endswith("self_attn.k_proj")):
            heads = config.num_attention_heads if pair.module.endswith("q_proj") else config.num_key_value_heads
            b = rope_rows(b, int(heads))
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(pair.a, dtype=np.float32))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
