"""Engine-step probe for benchmarks/decode_dycoke.py, imported by the offline child before its
engine starts (``run_offline(..., preload=["step_probe"])``; engine and scheduler share that
process).

The sync engine calls ``Scheduler.schedule`` once per step, so the time between two calls is
one whole step as a user sees it (schedule, forward, sampling, output processing). Each
step is recorded with its kind: *pure decode* when every scheduled request gets exactly one
token and none is new. ``report()``: per pure-decode step its batch size and duration, so a
batch's decode step time is measured over the steps in which all its requests decode
together, without the prefills that interleave with them in the other steps.
"""
import time

from vllm.v1.core.sched.scheduler import Scheduler

_STEPS: list[dict] = []  # one per schedule() call: t (perf_counter), decode (batch size or 0)
_schedule = Scheduler.schedule


def schedule(self, *args, **kwargs):
    t = time.perf_counter()
    out = _schedule(self, *args, **kwargs)
    counts = out.num_scheduled_tokens.values()
    pure = bool(counts) and not out.scheduled_new_reqs and all(n == 1 for n in counts)
    _STEPS.append({"t": t, "decode": len(counts) if pure else 0})
    return out


Scheduler.schedule = schedule


def report():
    """-> {"decode_steps": [[batch size, seconds], ...]}: each pure-decode step whose next step
    was scheduled too (its end is known)."""
    pairs = zip(_STEPS, _STEPS[1:])
    return {"decode_steps": [[a["decode"], b["t"] - a["t"]] for a, b in pairs if a["decode"]]}
