"""The quality benchmark's methods, declared as data: what each one runs and what it reports
(ARCHITECTURE.md, "Quality benchmark").

Strategy methods run the coordinator's strategies and the devices' handlers in process
(benchmarks.inprocess); the rest are references the runner trains directly:
- zero-shot: the models as they arrive;
- standalone / standalone-het: each device LoRA-tunes its SLM on its own data only (the shared
  SLM / each device's own SLM);
- centralized: the LLM and the shared SLM LoRA-tuned on every labelled training record (the
  devices' data and a labelled auxiliary set), the upper reference.
Ablations that isolate co-tuning's share:
- fedavg+aux: FedCoLLM with lambda_kd = 0, so the SLM is FedAvg + fine-tuning on the auxiliary
  data and the LLM is fine-tuned on the auxiliary data alone (`llm-aux-only`);
- fedcollm-oneway: FedCoLLM with a frozen LLM that only teaches the SLM;
- crosslm-answers: CrossLM with the LLM answering pool prompts, whichever synthesis was chosen.
FedAvg also runs with each exact LoRA aggregation (FFA-LoRA, SVD re-factorisation), and with each
update encoding (fp16, int8 per tensor, int8 per rank component) to price the bytes they save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "zero-shot" | "standalone" | "centralized" | "strategy"
    algorithm: str | None = None
    het: bool = False  # devices run their own SLMs
    llm: bool = False  # the method has an LLM to score
    lora: dict[str, Any] = field(default_factory=dict)  # overrides of the frozen settings
    distill: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the method's frozen params
    labelled_aux: bool = False  # only meaningful when the auxiliary data carries answers
    encoding: str = "fp32"  # RunSpec.update_encoding: how the devices' updates travel

    @property
    def cost(self) -> int:
        """Relative compute of one run, for starting the longest jobs first (parallel workers finish
        together): Co-PLMs trains two models per device and distils both ways on the device and the
        server; Centralized trains the LLM on every record; methods with an LLM distil on the server."""
        if self.algorithm == "co-plms":
            return 5
        if self.kind == "centralized":
            return 4
        if self.llm:
            return 3
        return {"strategy": 2, "standalone": 1 + self.het}.get(self.kind, 0)

    @property
    def reads_aux(self) -> bool:
        """Whether the server's auxiliary data enters the run: FedCoLLM and Co-PLMs distil on it and
        Centralized pools its answers; the others (CrossLM takes its prompts from the pool or the
        instructions) give the same run in every auxiliary mode, so one run serves all three."""
        return self.kind == "centralized" or self.algorithm in ("fedcollm", "co-plms")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("zero-shot", "zero-shot", llm=True),
    Method("zero-shot-het", "zero-shot", het=True),
    Method("standalone", "standalone"),
    Method("standalone-het", "standalone", het=True),
    Method("fedavg", "strategy", "fedavg", lora={"aggregation": "factors"}),
    Method("fedavg-ffa", "strategy", "fedavg", lora={"aggregation": "ffa"}),
    Method("fedavg-svd", "strategy", "fedavg", lora={"aggregation": "svd"}),
    Method("fedavg-fp16", "strategy", "fedavg", lora={"aggregation": "factors"}, encoding="fp16"),
    Method("fedavg-int8-tensor", "strategy", "fedavg", lora={"aggregation": "factors"}, encoding="int8-tensor"),
    Method("fedavg-int8-row", "strategy", "fedavg", lora={"aggregation": "factors"}, encoding="int8-row"),
    Method("fedcollm", "strategy", "fedcollm", llm=True),
    Method("fedavg+aux", "strategy", "fedcollm", llm=True, distill={"lambda_kd": 0.0}, labelled_aux=True),
    Method("fedcollm-oneway", "strategy", "fedcollm", distill={"direction": "llm_to_slm"}),
    Method("co-plms", "strategy", "co-plms", het=True, llm=True),
    Method("crosslm", "strategy", "crosslm", het=True, llm=True),
    # The synthesis mode the search did not choose, so CrossLM's selection loop runs in any case.
    Method("crosslm-answers", "strategy", "crosslm", het=True, llm=True, params={"synthesis": "answers"}),
    Method("centralized", "centralized", llm=True),
)}


# The real track's default: what its claims need (FedCoLLM's and Co-PLMs'; CrossLM and the FedAvg
# variants stay on the synthetic track), which fits one world x one seed in an hour on two cores.
REAL_TRACK_METHODS = ("zero-shot", "zero-shot-het", "standalone", "standalone-het", "fedavg", "fedcollm",
                      "fedavg+aux", "co-plms", "centralized")
# World seeds and training seeds a track reports by default (the real track: fewer, as its runs cost more).
DEFAULT_SEEDS = {"synthetic": ((0, 1, 2), 3), "real": ((0,), 1)}


def check_methods(names: tuple[str, ...] | list[str]) -> None:
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown or 'none given'}; choose from {', '.join(METHODS)}")
