"""Test hook (imported by the offline child before its engine starts): counts the calls that
reach the dense torch reference of indexed attention (``ops.paged_attention_ref``), which
materialises [heads, queries, keys], and those that reach the Triton decode kernel;
``report()`` returns the counts."""
from vllm_tokenzoom import ops
from vllm_tokenzoom.triton_kernels import indexed_attention as triton_kernels

_CALLS = {"reference_calls": 0, "triton_calls": 0}


def _counted(module, name: str, key: str) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        _CALLS[key] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


_counted(ops.ref, "indexed_paged_attention", "reference_calls")
_counted(triton_kernels, "indexed_decode_attention", "triton_calls")


def report():
    return dict(_CALLS)
