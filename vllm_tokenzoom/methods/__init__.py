"""One policy per method: a frozen dataclass whose fields are the method's settings.

Policies are pure: tensors or counts in, decisions out. They never touch vLLM state.
Adding a method: a file here, an entry in ``IMPLEMENTED`` (and in a preset if it
belongs to one, ``vllm_tokenzoom/config.py``), its dense reference in
``vllm_tokenzoom/reference/``, and the model or KV hook that applies it.
"""
from vllm_tokenzoom.methods.baselines import FrameSampling, RandomDrop, SpatialPool
from vllm_tokenzoom.methods.dp import DP
from vllm_tokenzoom.methods.ttm import TTM

# config name -> policy class, for the methods that work today (the last three are baselines)
IMPLEMENTED = {"ttm": TTM, "dp": DP, "random_drop": RandomDrop, "frame_sampling": FrameSampling,
               "spatial_pool": SpatialPool}
# the methods that prune the video before the LLM; a config enables at most one of them
PRE_LLM = ("ttm", "random_drop", "frame_sampling", "spatial_pool")
# names reserved for the methods of the roadmap (README "Methods")
PLANNED = ("fastv", "vas", "ata", "voa")

__all__ = ["DP", "IMPLEMENTED", "PLANNED", "PRE_LLM", "TTM", "FrameSampling", "RandomDrop", "SpatialPool"]
