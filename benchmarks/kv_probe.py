"""KV-cache probe for benchmarks/speed.py, imported by the offline child before its engine
starts (``run_offline(..., preload=["kv_probe"])``; engine and scheduler share that process).

After every ``Scheduler.schedule`` it records how many KV blocks each request holds and how
many requests are running, so the numbers are measured, not derived from token counts.
``report()``: the pool's usable blocks and block size, each request's peak blocks, the peaks
of blocks in use, of running requests and of running requests past their prefill, and the
number of preemptions.
"""
from vllm.v1.core.sched.scheduler import Scheduler

_LOG = {"peak_blocks": {}, "peak_used_blocks": 0, "peak_running": 0, "peak_decoding": 0, "preemptions": 0}
_schedule = Scheduler.schedule


def schedule(self, *args, **kwargs):
    out = _schedule(self, *args, **kwargs)
    manager = self.kv_cache_manager
    pool = manager.block_pool
    _LOG.update(num_blocks=pool.num_gpu_blocks - 1, block_size=manager.coordinator.single_type_managers[0].block_size)
    held: dict[str, int] = {}
    for group in manager.coordinator.single_type_managers:  # summed over KV-cache groups
        for rid, blocks in group.req_to_blocks.items():
            held[rid] = held.get(rid, 0) + sum(not b.is_null for b in blocks)
    for rid, n in held.items():
        _LOG["peak_blocks"][rid] = max(_LOG["peak_blocks"].get(rid, 0), n)
    _LOG["peak_used_blocks"] = max(_LOG["peak_used_blocks"], pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
    _LOG["peak_running"] = max(_LOG["peak_running"], len(self.running))
    # past their prefill: every prompt token has its KV block (admitted-but-chunked ones may be preempted)
    decoding = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in self.running)
    _LOG["peak_decoding"] = max(_LOG["peak_decoding"], decoding)
    _LOG["preemptions"] += len(getattr(out, "preempted_req_ids", None) or ())
    return out


Scheduler.schedule = schedule


def report():
    return _LOG
