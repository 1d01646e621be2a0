"""Test hook (imported by the offline child before its engine starts; engine, worker and
scheduler share that process): at each DyCoke request's first decode decision, permanently
evict token positions [128, 384), two whole blocks of 128, in every layer (a permanent policy
layer covering layer 0 on, as ZoomVLM's `ata` drops will). ``TOKENZOOM_TEST_NO_RECLAIM=1``
keeps the eviction but never reports blocks (mask only). ``report()`` returns what the
scheduler freed and allocated."""
import os

from vllm_tokenzoom.v1.core.sched import scheduler as tz_scheduler
from vllm_tokenzoom.v1.worker import reports, sessions

DEAD = (128, 384)
_LOG = {"steps": [], "free_blocks": []}
_original_decide = sessions.RequestSession.decide


def decide(self, name, layer, position, scores):
    changed = _original_decide(self, name, layer, position, scores)
    if name == "dp" and "test_evict" not in self.view.layers:
        positions = self.token_map.positions
        value = ((positions < DEAD[0]) | (positions >= DEAD[1])).float()
        assert int((value == 0).sum()) == DEAD[1] - DEAD[0], "the evicted span must be visual tokens"
        self.view.push("test_evict", 0, position, value, permanent=True)
        return True
    return changed


sessions.RequestSession.decide = decide
if os.environ.get("TOKENZOOM_TEST_NO_RECLAIM") == "1":
    reports.collect_reclaimable = lambda requests, block_size: {}

_original_update = tz_scheduler.TokenZoomSchedulerMixin.update_from_output


def update_from_output(self, scheduler_output, model_runner_output):
    out = _original_update(self, scheduler_output, model_runner_output)
    manager = self.kv_cache_manager.coordinator.single_type_managers[0]
    # this step's block table of every request holding blocks: {req_id: [physical ids]}
    _LOG["steps"].append({rid: [b.block_id for b in blocks if not b.is_null]
                          for rid, blocks in manager.req_to_blocks.items() if blocks})
    _LOG["free_blocks"].append(self.kv_cache_manager.block_pool.get_num_free_blocks())
    _LOG["freed"] = getattr(self, "tokenzoom_freed", [])
    return out


tz_scheduler.TokenZoomSchedulerMixin.update_from_output = update_from_output


def report():
    """Steps' block tables, free-block counts, freed blocks; and the pool's free count now."""
    return _LOG
