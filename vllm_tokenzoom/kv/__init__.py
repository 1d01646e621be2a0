"""Per-request KV state, method-agnostic: the token map, the token view, the cache layout."""
from vllm_tokenzoom.kv.layout import CacheLayout, Segment
from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.kv.view import TokenView

__all__ = ["CacheLayout", "Segment", "TokenMap", "TokenView"]
