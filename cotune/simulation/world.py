"""What a simulation needs that the user did not bring, made here so `cotune simulate` runs on
a fresh machine: tiny untrained models (a byte-level BPE tokenizer trained on the data's text,
a llama-shaped "tiny" SLM and "small" LLM, as the tests' tiny world builds them), and, without
`--data`, the demo's synthetic multi-domain task (ARCHITECTURE.md, "Demo world")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.records import TaskRecord, write_jsonl

TINY_VOCAB = 384


@dataclass
class TinyModels:
    slm_dir: Path
    llm_dir: Path | None


def build_tiny_models(texts: Sequence[str], out_dir: Path, seed: int, with_llm: bool) -> TinyModels:
    """Seeded, untrained tiny checkpoints sharing one tokenizer trained on `texts`."""
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import save_tokenizer, train_tokenizer
    from cotune.demo.tiny import build_tiny_model

    tok_dir = save_tokenizer(train_tokenizer(list(texts), vocab_size=TINY_VOCAB), out_dir / "tokenizer")
    slm = save_checkpoint(build_tiny_model("llama", "tiny", vocab_size=TINY_VOCAB, seed=seed), tok_dir,
                          out_dir / "slm")
    llm = None
    if with_llm:
        llm = save_checkpoint(build_tiny_model("llama", "small", vocab_size=TINY_VOCAB, seed=seed + 1), tok_dir,
                              out_dir / "llm")
    return TinyModels(Path(slm), Path(llm) if llm is not None else None)


def texts_of(records: Sequence[TaskRecord]) -> list[str]:
    return [text for r in records for text in (r.prompt, r.response, *(m.content for m in r.context))]


@dataclass
class SyntheticData:
    pool: Path  # every device's records, with their domain
    aux: Path  # public auxiliary records (the server's, for FedCoLLM and the other server steps)
    test: Path  # held out, scored by the server each round


def synthetic_data(out_dir: Path, num_devices: int, seed: int) -> SyntheticData:
    """The demo's four invented languages, about 16 records a device (40 to 400 per language),
    a device's share of each language left to the partition."""
    from cotune.demo.synthetic import make_suite

    per_client = min(400, max(40, math.ceil(16 * num_devices / 4)))
    suite = make_suite(num_clients=4, seed=seed, skew=0.25, per_client=per_client, public_size=0, aux_size=80,
                       test_per_domain=10)
    paths = SyntheticData(out_dir / "pool.jsonl", out_dir / "aux.jsonl", out_dir / "test.jsonl")
    write_jsonl(paths.pool, [r for records in suite.clients for r in records])
    write_jsonl(paths.aux, suite.aux)
    write_jsonl(paths.test, suite.test)
    return paths
