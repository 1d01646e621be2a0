"""One policy per method: a frozen dataclass whose fields are the method's settings.

Policies are pure: tensors or counts in, decisions out. They never touch vLLM state.
Each declares its stage, the scores it needs and its engine requirements (``base.py``).
Adding a method (docs/architecture.md, "Adding a method"): a file here, one line in
``REGISTRY``, its dense reference in ``vllm_tokenzoom/reference/``, its tests.
"""
from vllm_tokenzoom.methods.ata import ATA
from vllm_tokenzoom.methods.base import (
    DecodePolicy,
    KeptTokens,
    Policy,
    PreLLMPolicy,
    PrefillPolicy,
    Queries,
    Requirements,
    ScoreRequest,
    Stage,
)
from vllm_tokenzoom.methods.baselines import FrameSampling, RandomDrop, SpatialPool
from vllm_tokenzoom.methods.dp import DP
from vllm_tokenzoom.methods.fastv import FastV
from vllm_tokenzoom.methods.ttm import TTM
from vllm_tokenzoom.methods.vas import VAS
from vllm_tokenzoom.methods.voa import VOA

# config name -> policy class, for the methods that work today (the last three are baselines)
REGISTRY: dict[str, type[Policy]] = {
    "ttm": TTM,
    "fastv": FastV,
    "vas": VAS,
    "dp": DP,
    "ata": ATA,
    "voa": VOA,
    "random_drop": RandomDrop,
    "frame_sampling": FrameSampling,
    "spatial_pool": SpatialPool,
}
# names reserved for the methods of the roadmap (README "Methods")
PLANNED: tuple[str, ...] = ()
# at most one policy per config for these stages (one pre-LLM plan per video, one death-layer writer)
ONE_PER_CONFIG = (Stage.PRE_LLM, Stage.PREFILL)


def of_stage(stage: Stage) -> tuple[str, ...]:
    return tuple(name for name, cls in REGISTRY.items() if cls.stage is stage)


__all__ = ["ATA", "DP", "FastV", "PLANNED", "REGISTRY", "TTM", "DecodePolicy", "FrameSampling", "KeptTokens", "Policy",
           "PreLLMPolicy", "PrefillPolicy", "Queries", "RandomDrop", "Requirements", "ScoreRequest", "SpatialPool",
           "Stage", "VAS", "VOA", "of_stage"]
