"""Attention kernels over a paged KV cache read through a token view.

One dispatch point, ``indexed_paged_attention``: today the torch reference
(``paged_attention_ref``); compiled kernels plug in here.
"""
from vllm_tokenzoom.ops.paged_attention_ref import indexed_paged_attention

__all__ = ["indexed_paged_attention"]
