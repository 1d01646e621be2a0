"""Per-request timing and KV probe for benchmarks/zoomvlm.py, imported by the offline child
before its engine starts (``run_offline(..., preload=["voa_probe"])``).

Under tokenzoom's own patches (which wrap these), it sees each engine request: a VOA request
is two of them (its passes) under one id, so both are recorded under the id the ``LLM`` gave.
``report()``: per request, when it was added, when its first token and its last came out
(``time.perf_counter``) and each step's output with a new token, its tokens; and after every ``Scheduler.schedule`` the KV blocks it
holds (a series over the scheduler's steps).
"""
import time

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.llm_engine import LLMEngine

_LOG = {"requests": {}, "blocks": {}, "step": 0}
_add, _step, _schedule = LLMEngine.add_request, LLMEngine.step, Scheduler.schedule


def _user_id(rid: str) -> str:
    return rid.rsplit("-", 1)[0]  # vLLM appends "-<8 hex>" to the id the LLM gave


def add_request(self, request_id, prompt, params, *args, **kwargs):
    from vllm.sampling_params import RequestOutputKind

    _LOG["requests"].setdefault(request_id, {"added": time.perf_counter(), "first": None, "last": None, "tokens": 0,
                                                "times": []})
    if params.output_kind == RequestOutputKind.FINAL_ONLY:  # LLM.generate's: an output per step, to time tokens
        params = params.clone()
        params.output_kind = RequestOutputKind.CUMULATIVE
    return _add(self, request_id, prompt, params, *args, **kwargs)


def step(self):
    outs = _step(self)
    now = time.perf_counter()
    for out in outs:
        rec = _LOG["requests"].get(out.request_id)
        if rec is None:
            continue
        made = len(out.outputs[0].token_ids)
        if made and rec["first"] is None:
            rec["first"] = now
        if made:
            rec["last"] = now
            rec["times"].append(now)  # one output per step with a new token
        if out.finished:
            rec["tokens"] += made  # per pass (the second pass's output counts its own tokens)
    return outs


def schedule(self, *args, **kwargs):
    out = _schedule(self, *args, **kwargs)
    _LOG["step"] += 1
    held: dict[str, int] = {}
    for group in self.kv_cache_manager.coordinator.single_type_managers:
        for rid, blocks in group.req_to_blocks.items():
            held[_user_id(rid)] = held.get(_user_id(rid), 0) + sum(not b.is_null for b in blocks)
    for rid, n in held.items():
        _LOG["blocks"].setdefault(rid, []).append((_LOG["step"], n))
    return out


LLMEngine.add_request, LLMEngine.step, Scheduler.schedule = add_request, step, schedule


def report():
    return _LOG
