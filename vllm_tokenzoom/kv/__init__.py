"""The token view of vLLM's paged KV cache (DESIGN.md §4): multiplicities, plans, applying them."""
from vllm_tokenzoom.kv.view import KVPlan, TokenView

__all__ = ["KVPlan", "TokenView"]
