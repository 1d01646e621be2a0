"""Test hook (imported by the offline child before its engine starts): counts the calls that
reach the dense torch reference of indexed attention (``ops.paged_attention_ref``), which
materialises [heads, queries, keys], those that reach the Triton decode kernel, and the
attention backend's kernel calls that compute the attention mass (``mass_calls``, any kernel);
``report()`` returns the counts."""
from vllm_tokenzoom import ops
from vllm_tokenzoom.triton_kernels import indexed_attention as triton_kernels
from vllm_tokenzoom.v1.attention.backends import indexed

_CALLS = {"reference_calls": 0, "triton_calls": 0, "mass_calls": 0}


def _counted(module, name: str, key: str, only_mass: bool = False) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        if not only_mass or kwargs.get("want_mass", True):
            _CALLS[key] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


_counted(ops.ref, "indexed_paged_attention", "reference_calls")
_counted(triton_kernels, "indexed_decode_attention", "triton_calls")
for _name in ("indexed_paged_attention", "run_decode_requests"):
    _counted(indexed, _name, "mass_calls", only_mass=True)


def report():
    return dict(_CALLS)
