"""Engine-step probe for benchmarks/decode_dycoke.py, imported by the offline child before its
engine starts (``run_offline(..., preload=["step_probe"])``; engine and scheduler share that
process).

The sync engine calls ``Scheduler.schedule`` once per step, so the time between two calls is
one whole step as a user sees it (schedule, forward, sampling, output processing). Each
step is recorded with its kind: *pure decode* when every scheduled request gets exactly one
token and none is new. ``report()``: per pure-decode step its batch size and duration, so a
batch's decode step time is measured over the steps in which all its requests decode
together, without the prefills that interleave with them in the other steps. Also the seconds
the step spent in Python's garbage collector (``gc.callbacks``): a cost of every Python object a
step allocates, which a profiler puts on whatever line happened to trigger it; and in
tokenzoom's C++ attention kernel (``ops._cpp_decode``, all its calls of the step, the threads
torch gives it): the rest of a step over vanilla's is tokenzoom's Python or vLLM's own work.
"""
import gc
import time

import torch
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_tokenzoom import ops

_STEPS: list[dict] = []  # one per schedule() call: t (perf_counter), decode (batch size or 0), gc seconds
_schedule = Scheduler.schedule
_GC = {"start": 0.0, "seconds": 0.0}  # the running collection's start; seconds collected since the last schedule()
_KERNEL = {"seconds": 0.0, "threads": None}  # seconds in the C++ kernel since the last schedule()
_cpp_decode = ops._cpp_decode


def _timed_cpp_decode(*args, **kwargs):
    t = time.perf_counter()
    try:
        return _cpp_decode(*args, **kwargs)
    finally:
        _KERNEL["seconds"] += time.perf_counter() - t
        _KERNEL["threads"] = torch.get_num_threads()


ops._cpp_decode = _timed_cpp_decode

# Seconds per step in these calls: the model's layers (``_model_forward``), in them the attention
# layer (vLLM's kernel, or tokenzoom's with its Python) and tokenzoom's step hooks; outside them
# tokenzoom's runner hooks. A step over its oracle's then splits into vLLM's attention, tokenzoom's
# kernel, tokenzoom's Python (attention layer less the kernels; hooks), the layers' other work
# (matmuls, norms) and the rest of the step (logits, sampling, scheduling, output).
_SPANS = dict.fromkeys(("model_forward", "attention_layer", "vllm_attention", "tz_hooks_forward", "tz_hooks_runner"),
                       0.0)


def _time_calls(owner, name: str, span: str) -> None:
    call = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            _SPANS[span] += time.perf_counter() - t

    setattr(owner, name, timed)


def _time_tokenzoom() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_tokenzoom.v1.attention.backends.indexed import IndexedRowsMixin
    from vllm_tokenzoom.v1.worker import reports, sessions
    from vllm_tokenzoom.v1.worker.step import Step

    _time_calls(GPUModelRunner, "_model_forward", "model_forward")  # the layers (the logits come after)
    _time_calls(IndexedRowsMixin, "forward", "attention_layer")
    _time_calls(CPUAttentionBackendImpl, "forward", "vllm_attention")  # also as the layer's super().forward
    for owner, name in ((Step, "begin"), (Step, "finish"), (Step, "complete_token_maps"), (Step, "may_drop_rows")):
        _time_calls(owner, name, "tz_hooks_forward")
    for owner, name in ((reports, "attach_reports"), (sessions, "begin_step")):
        _time_calls(owner, name, "tz_hooks_runner")


_time_tokenzoom()


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _GC["start"] = time.perf_counter()
    else:
        _GC["seconds"] += time.perf_counter() - _GC["start"]


gc.callbacks.append(_on_gc)


def schedule(self, *args, **kwargs):
    t = time.perf_counter()
    out = _schedule(self, *args, **kwargs)
    counts = out.num_scheduled_tokens.values()
    pure = bool(counts) and not out.scheduled_new_reqs and all(n == 1 for n in counts)
    if _STEPS:  # the collections since the previous schedule() were that step's
        _STEPS[-1]["gc"], _GC["seconds"] = _GC["seconds"], 0.0
        _STEPS[-1]["kernel"], _KERNEL["seconds"] = _KERNEL["seconds"], 0.0
        _STEPS[-1].update(_SPANS)
        _SPANS.update(dict.fromkeys(_SPANS, 0.0))
    _STEPS.append({"t": t, "decode": len(counts) if pure else 0, "batch": min(out.num_scheduled_tokens, default="")})
    return out


Scheduler.schedule = schedule


def report():
    """-> {"decode_steps": [[batch size, seconds], ...], "decode_gc_s": [seconds collecting, ...],
    "decode_kernel_s": [seconds in the C++ kernel, ...], "kernel_threads": n, "decode_batch":
    [the step's smallest request id, ...] (which of several batches run one after another it
    was)}: each pure-decode step whose next step was scheduled too (its end is known)."""
    pairs = [(a, b) for a, b in zip(_STEPS, _STEPS[1:]) if a["decode"]]
    return {"decode_steps": [[a["decode"], b["t"] - a["t"]] for a, b in pairs],
            "decode_batch": [a["batch"] for a, _ in pairs],
            "decode_gc_s": [a.get("gc", 0.0) for a, _ in pairs],
            "decode_kernel_s": [a.get("kernel", 0.0) for a, _ in pairs], "kernel_threads": _KERNEL["threads"],
            "decode_spans_s": [{k: a.get(k, 0.0) for k in _SPANS} for a, _ in pairs]}
