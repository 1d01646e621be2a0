"""Test hook (imported by the offline child before its engine starts): counts the calls that
reach the dense torch reference of indexed attention (``ops.paged_attention_ref``), which
materialises [heads, queries, keys]; ``report()`` returns the count."""
from vllm_tokenzoom import ops

_CALLS = [0]
_original = ops.ref.indexed_paged_attention


def indexed_paged_attention(*args, **kwargs):
    _CALLS[0] += 1
    return _original(*args, **kwargs)


ops.ref.indexed_paged_attention = indexed_paged_attention


def report():
    return {"reference_calls": _CALLS[0]}
