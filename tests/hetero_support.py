"""Helpers for tests with heterogeneous devices: SLMs of other architectures (and one with
its own tokenizer), and `cotune edge join` processes that bring them."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.manifest import BuildManifest
from cotune.demo.quickstart import child_env, cotune_cmd
from tests.support import CoordinatorProcess, TinyWorld


@dataclass
class HetSlms:
    llama: Path  # the run's tokenizer, another init than the run's SLM
    gpt2: Path  # the run's tokenizer
    qwen2: Path  # the run's tokenizer
    qwen2_own_tok: Path  # its own, smaller tokenizer trained on the same text
    no_tokenizer: Path  # a checkpoint without tokenizer.json


def build_het_slms(world: TinyWorld, root: Path) -> HetSlms:
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import save_tokenizer, train_tokenizer
    from common.records import read_jsonl
    from cotune.demo.tiny import build_tiny_model

    tok_dir = world.root / "tokenizer"
    texts = [t for path in world.data.values() for r in read_jsonl(path) for t in (r.prompt, r.response)]
    own_tok = save_tokenizer(train_tokenizer(texts, vocab_size=320), root / "tokenizer-320")
    no_tok = save_checkpoint(build_tiny_model("llama", "tiny", 384, seed=31), tok_dir, root / "no-tokenizer")
    (no_tok / "tokenizer.json").unlink()
    return HetSlms(
        llama=save_checkpoint(build_tiny_model("llama", "tiny", 384, seed=11), tok_dir, root / "llama"),
        gpt2=save_checkpoint(build_tiny_model("gpt2", "tiny", 384, seed=12), tok_dir, root / "gpt2"),
        qwen2=save_checkpoint(build_tiny_model("qwen2", "tiny", 384, seed=13), tok_dir, root / "qwen2"),
        qwen2_own_tok=save_checkpoint(build_tiny_model("qwen2", "tiny", 320, seed=14), own_tok, root / "qwen2-320"),
        no_tokenizer=no_tok,
    )


def _cli_takes_slm() -> bool:
    from cotune.cli.main import edge_join

    return "slm" in inspect.signature(edge_join).parameters


# Until `cotune edge join --slm` is wired, the same worker the CLI runs, started the same way.
_SHIM = """
import json, sys
from pathlib import Path
from edge_sdk.worker import EdgeWorker, JoinConfig
a = json.loads(sys.argv[1])
cfg = JoinConfig(coordinator=a["url"], enroll_token=a["token"], data=Path(a["data"]), name=a["name"],
                 state_dir=Path(a["state_dir"]), poll_s=0.3, progress=False, local_slm=Path(a["slm"]))
result = EdgeWorker(cfg, on_event=lambda m: print(f"[{a['name']}] {m}", flush=True)).run()
print(f"[{a['name']}] final adapter sha256 {result.final_adapter_sha256}")
"""


def device_cmd(coord: CoordinatorProcess, data: Path, name: str, state_dir: Path, slm: Path | None) -> list[str]:
    """`cotune edge join` for one device, bringing its own SLM when `slm` is given."""
    args = ["--coordinator", coord.url, "--enroll-token", coord.run["enroll_token"], "--data", str(data),
            "--name", name, "--state-dir", str(state_dir), "--threads", "1", "--poll", "0.3", "--no-progress"]
    if slm is None:
        return cotune_cmd("edge", "join", *args)
    if _cli_takes_slm():
        return cotune_cmd("edge", "join", *args, "--slm", str(slm))
    return [sys.executable, "-c", _SHIM, json.dumps({"url": coord.url, "token": coord.run["enroll_token"],
                                                     "data": str(data), "name": name,
                                                     "state_dir": str(state_dir), "slm": str(slm)})]


def run_devices(coord: CoordinatorProcess, world: TinyWorld, slms: list[Path | None], tmp: Path,
                timeout: float = 420) -> dict:
    """Start one device process per entry (client k's data), wait for all, return the run status."""
    procs = []
    try:
        for k, slm in enumerate(slms):
            log = (tmp / f"device-{k}.log").open("w")
            cmd = device_cmd(coord, world.data[f"client_{k}"], f"device-{k}", tmp / f"device-{k}", slm)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env()))
        for k, proc in enumerate(procs):
            code = proc.wait(timeout)
            assert code == 0, f"device {k} failed:\n{(tmp / f'device-{k}.log').read_text()[-3000:]}\n" \
                              f"coordinator:\n{coord.log_tail()}"
        return coord.status(coord.run_id())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def device_build(tmp: Path, k: int) -> BuildManifest | None:
    """The edge build device k made of its own final SLM and reported (None: it said why not)."""
    held = json.loads((tmp / f"device-{k}" / "final" / "final.json").read_text())
    log = (tmp / f"device-{k}.log").read_text()
    if held["build_dir"] is None:
        assert "no edge builds made" in log, log[-3000:]
        return None
    manifest = BuildManifest.read(Path(held["build_dir"]))
    assert manifest.adapter_sha256 == held["adapter_sha256"], "the build is not of the device's final adapter"
    assert manifest.run_id == held["run_id"] and manifest.parity
    assert f"edge build {Path(held['build_dir']).name} made in" in log and "and reported" in log, log[-3000:]
    return manifest
