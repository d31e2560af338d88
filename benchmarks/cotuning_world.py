"""The quality benchmark's world: the demo world's tokenizer and pretrained LLM / SLM
(cotune.demo.world), SLMs of two more architectures pretrained the same way, the data
splits, and CrossLM's prompt pool.

- Heterogeneous SLMs (Co-PLMs, CrossLM, Standalone-het): client k runs HET[k % 3]: the demo
  SLM (llama, tiny), a gpt2 of the same tiny size, and a qwen2 one size up; the two extra
  ones get the demo SLM's pretraining recipe on the same public pool, so all arrive weak.
- Data: make_suite with the demo world's seed. Public, aux and test do not depend on the
  number or size of client splits, so at scale 1 the three clients' data are the demo
  world's; at larger scales the clients have more records and the test more phrases.
- Prompt pool (CrossLM): the prompts of four more "virtual" clients of the same suite, so
  they never repeat a test or client phrase; their responses are blanked in the pool file
  and kept aside only to score how correct the selected synthetic samples were.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.records import TaskRecord, write_jsonl

NUM_CLIENTS = 3
POOL_CLIENTS = 4
# (arch, size) per client; llama/tiny is the demo world's own SLM.
HET = (("llama", "tiny"), ("gpt2", "tiny"), ("qwen2", "small"))
HET_VERSION = "bench-het-1"


@dataclass
class BenchWorld:
    root: Path
    tokenizer_dir: Path
    llm_dir: Path
    slm_dir: Path  # the shared SLM of the homogeneous methods (and Co-PLMs' proxy base)
    het_slms: list[Path]  # per client: its own SLM in the heterogeneous methods
    aux: Path
    test: Path
    clients: list[Path]
    client_tests: list[Path]
    prompt_pool: Path
    truth: dict[str, str] = field(default_factory=dict)  # pool prompt -> reference answer
    stats: dict[str, Any] = field(default_factory=dict)


def _het_slm(arch: str, size: str, seed: int, world: Any, public: list[TaskRecord], out: Path) -> Path:
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import load_hf_tokenizer
    from cotune.demo.tiny import build_tiny_model, pretrain
    from cotune.demo.world import MAX_LEN, SLM, VOCAB_SIZE

    model = build_tiny_model(arch, size, VOCAB_SIZE, seed=seed)
    pretrain(model, load_hf_tokenizer(world.tokenizer_dir), public, steps=SLM["steps"], lr=SLM["lr"],
             batch_size=SLM["batch_size"], max_len=MAX_LEN, seed=seed)
    return save_checkpoint(model, world.tokenizer_dir, out)


def build_bench_world(out_dir: Path, seed: int = 0, scale: float = 1.0, cache_dir: Path | None = None,
                      progress: bool = False) -> BenchWorld:
    from cotune.demo.synthetic import make_suite
    from cotune.demo.world import SLM, prepare_world

    out_dir = Path(out_dir)
    world = prepare_world(out_dir / "demo", num_clients=NUM_CLIENTS, seed=seed, cache_dir=cache_dir,
                          progress=progress)
    per_client, test_per_domain = round(300 * scale), round(30 * scale)
    suite = make_suite(num_clients=NUM_CLIENTS + POOL_CLIENTS, seed=seed, per_client=per_client,
                       test_per_domain=test_per_domain)
    data = out_dir / "data"
    paths = {"aux": data / "aux.jsonl", "test": data / "test.jsonl"}
    write_jsonl(paths["aux"], suite.aux)
    write_jsonl(paths["test"], suite.test)
    clients, client_tests = [], []
    for k in range(NUM_CLIENTS):
        clients.append(data / f"client_{k}.jsonl")
        client_tests.append(data / f"client_{k}_test.jsonl")
        write_jsonl(clients[-1], suite.clients[k])
        write_jsonl(client_tests[-1], suite.client_tests[k])
    pool = [r for k in range(NUM_CLIENTS, NUM_CLIENTS + POOL_CLIENTS) for r in suite.clients[k]]
    write_jsonl(data / "prompt_pool.jsonl", [TaskRecord(r.prompt, "", r.domain) for r in pool])

    # Pretrained once per world and recipe; a copy (not a rebuild) on later runs.
    key = hashlib.sha256(json.dumps({"v": HET_VERSION, "world": str(world.stats.get("cache_entry", out_dir)),
                                     "seed": seed, "slm": SLM, "het": HET}, sort_keys=True).encode()).hexdigest()[:16]
    het_root = (Path(cache_dir) if cache_dir else out_dir) / f"bench-het-{key}"
    het_slms = []
    for k, (arch, size) in enumerate(HET):
        if arch == "llama" and size == "tiny":
            het_slms.append(world.slm_dir)
            continue
        target = het_root / f"{arch}-{size}"
        if not (target / "config.json").is_file():
            _het_slm(arch, size, seed + 10 + k, world, suite.public, target)
        het_slms.append(target)
    return BenchWorld(
        root=out_dir, tokenizer_dir=world.tokenizer_dir, llm_dir=world.llm_dir, slm_dir=world.slm_dir,
        het_slms=het_slms, aux=paths["aux"], test=paths["test"], clients=clients, client_tests=client_tests,
        prompt_pool=data / "prompt_pool.jsonl", truth={r.prompt: r.response for r in pool},
        stats={"demo_world": world.stats, "per_client": per_client, "test_per_domain": test_per_domain,
               "pool_prompts": len(pool), "het": [f"{a}-{s}" for a, s in HET]},
    )
