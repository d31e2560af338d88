"""Quickstart: co-tune a tiny LLM and three tiny device SLMs with FedCoLLM on loopback.

Run it with `./dev.sh quickstart` (or `cotune demo`, or `python examples/quickstart.py`).
It starts a real coordinator and three `cotune edge join` processes, runs three rounds
on synthetic non-IID multi-domain data, and prints per-round scores and bytes moved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cotune.demo.quickstart import run_quickstart

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cotune/demo"))
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algorithm", default="fedcollm", choices=["fedcollm", "fedavg"])
    args = parser.parse_args()
    run_quickstart(args.workdir, num_clients=args.clients, rounds=args.rounds, algorithm=args.algorithm)
