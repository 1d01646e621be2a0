"""Block reclamation: whole KV blocks whose tokens are permanently dead in every layer go
back to vLLM's pool while their request runs; another request reuses them; neither
output changes; and after every request ends the free-block count is back where it was."""
import pytest
import torch

from vllm_tokenzoom.kv.view import KVPlan, TokenView
from vllm_tokenzoom.methods.dp import DP
from vllm_tokenzoom.testing.offline import run_offline
from vllm_tokenzoom.v1.worker.sessions import RequestSession, reclaimable_blocks

REQUESTS = [dict(frames=16, seed=80, max_tokens=24), dict(frames=16, seed=81, max_tokens=24)]
DYCOKE = {"tokenzoom": {"preset": "dycoke"}}
TIGHT = {"num_gpu_blocks_override": 24, "max_model_len": 2048}  # 2 x 13 blocks of 128 do not fit together


def test_only_blocks_dead_in_every_group_are_reclaimable():
    session = RequestSession("r", num_prompt_tokens=600, visual_positions=torch.arange(10, 500), dp=DP(layer=2))
    dead = torch.arange(128, 384)
    session.view.apply(KVPlan(1, dead, torch.zeros(256), permanent=True), at_position=600)
    assert reclaimable_blocks(session, 601, 128) == []  # group 0 still reads them
    session.view.apply(KVPlan(0, torch.arange(128, 300), torch.zeros(172), permanent=True), at_position=601)
    assert reclaimable_blocks(session, 602, 128) == [1]  # block 2 is only partly dead in group 0
    session.view.apply(KVPlan(0, torch.arange(300, 384), torch.zeros(84), permanent=True), at_position=602)
    assert reclaimable_blocks(session, 603, 128) == [2]  # reported once each
    assert reclaimable_blocks(session, 604, 128) == []


def test_permanent_evictions_are_never_revived():
    view = TokenView((0, 2))
    view.apply(KVPlan(1, torch.tensor([3, 4]), torch.zeros(2), permanent=True), at_position=10)
    view.apply(KVPlan(1, torch.tensor([7]), torch.zeros(1), reset=True), at_position=11)  # a DyCoke-style reset
    assert view.multiplicity(2, 8).tolist() == [1, 1, 1, 0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="permanently evicted"):
        view.apply(KVPlan(1, torch.tensor([4]), torch.ones(1)), at_position=12)


@pytest.fixture(scope="module")
def runs(tiny_model):
    kwargs = dict(additional_config=DYCOKE, batch=True, preload=["tests.evict_hook"])
    return dict(
        freeing=run_offline(tiny_model, REQUESTS, llm_kwargs=TIGHT, **kwargs),
        mask_only=run_offline(tiny_model, REQUESTS, env={"TOKENZOOM_TEST_NO_RECLAIM": "1"}, **kwargs),
    )


def test_freed_blocks_are_reused_by_another_running_request(runs):
    log = runs["freeing"]["reports"]["tests.evict_hook"]
    freed = {(rid, block) for rid, _, block in log["freed"]}
    assert {rid for rid, _ in freed} == {step_rid for step in log["steps"] for step_rid in step}  # both freed 2
    reused = [(step, rid) for step in log["steps"] for rid, blocks in step.items()
              if any(block in blocks and owner != rid and owner in step for owner, block in freed)]
    assert reused, "no request received a block freed by another request that was still running"


def test_outputs_unchanged_by_freeing(runs):
    assert [o["tokens"] for o in runs["freeing"]["outputs"]] == [o["tokens"] for o in runs["mask_only"]["outputs"]]


def test_free_block_count_back_to_baseline(runs):
    log = runs["freeing"]["reports"]["tests.evict_hook"]
    assert min(log["free_blocks"]) < log["free_blocks"][-1] == 24 - 1  # all but the null block
