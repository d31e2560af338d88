"""What Co-PLMs and CrossLM share on the server: the join checks for the SLM a device
brings (ClientRegistration.slm)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cloud.strategies.base import SpecError
from common.protocol import ClientRegistration, SlmInfo


class SlmJoinPolicy(BaseModel):
    """Which devices' own SLMs a run takes."""

    require_own_slm: bool = Field(
        False, description="refuse devices that bring no SLM (otherwise they use the run's published base)")
    allowed_archs: list[str] | None = Field(
        None, description="model_type values a device SLM may have, e.g. ['llama', 'gpt2', 'qwen2']; None: any")


def check_device_slm(registration: ClientRegistration, policy: SlmJoinPolicy, algorithm: str) -> SlmInfo | None:
    """The device's SLM if it passes the policy (None: it brings none and may use the run's)."""
    slm = registration.slm
    if slm is None:
        if policy.require_own_slm:
            raise SpecError(
                f"this {algorithm} run needs every device to bring its own SLM; join with --slm DIR "
                "(a transformers checkpoint directory with safetensors weights and tokenizer.json)"
            )
        return None
    if policy.allowed_archs is not None and slm.arch not in policy.allowed_archs:
        raise SpecError(
            f"this {algorithm} run takes SLMs of architecture {', '.join(policy.allowed_archs)}; "
            f"this device's SLM is {slm.arch!r}"
        )
    if slm.tokenizer_sha256 is None:
        raise SpecError(
            f"the device's SLM checkpoint has no tokenizer.json; {algorithm} runs the SLM on text, so save "
            "the SLM's tokenizer into its checkpoint directory"
        )
    if slm.vocab_size <= 0:
        raise SpecError("the device's SLM declares no vocabulary size (config.json vocab_size)")
    return slm
