"""Block reclamation: whole KV blocks whose tokens are permanently dead in every layer go
back to vLLM's pool while their request runs; another request reuses them; neither
output changes; and after every request ends the free-block count is back where it was."""
import pytest
import torch

from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.methods import DP
from vllm_tokenzoom.testing.offline import run_offline
from vllm_tokenzoom.v1.worker.reports import reclaimable_blocks
from vllm_tokenzoom.v1.worker.sessions import RequestSession

REQUESTS = [dict(frames=16, seed=80, max_tokens=24), dict(frames=16, seed=81, max_tokens=24)]
DYCOKE = {"tokenzoom": {"preset": "dycoke"}}
TIGHT = {"num_gpu_blocks_override": 24, "max_model_len": 2048}  # 2 x 13 blocks of 128 do not fit together


def session_with_video(offset=10, length=491, prefill=None):
    """A 600-token prompt whose visual tokens sit at positions [offset, offset + length - 1)."""
    token_map = TokenMap.build(600, [(offset, length)], [None])
    return RequestSession("r", token_map, 4, prefill or {}, {"dp": DP(layer=2)})


def evict(session, positions, at):
    """Permanently evict the visual tokens at ``positions`` in every layer, from query ``at`` on."""
    value = torch.ones(session.token_map.num_visual)
    value[positions - 10] = 0
    layer = session.view.layers.get("evict")
    if layer is not None:
        value[layer.forever] = 0
    session.view.push("evict", 0, at, value, permanent=True)


def test_only_blocks_no_layer_reads_are_reclaimable():
    session = session_with_video()
    session.view.push("dp", 2, 600, (torch.arange(490) % 2).float())  # revivable: frees nothing
    assert reclaimable_blocks(session, 601, 128) == []
    evict(session, torch.arange(128, 300), at=601)
    assert reclaimable_blocks(session, 602, 128) == [1]  # block 2 is only partly dead
    evict(session, torch.arange(300, 384), at=602)
    assert reclaimable_blocks(session, 603, 128) == [2]  # reported once each
    assert reclaimable_blocks(session, 604, 128) == []


def test_compacted_layers_keep_the_blocks_they_store_alive_tokens_in():
    """After prefill drops, later layers store their alive tokens at cache indices 0, 1, ...:
    a block whose own positions all died may still hold those layers' tokens (hand-derived)."""
    session = session_with_video(length=552)  # visual positions 10..560, newline 561, N = 600
    session.view.drop_after(torch.arange(551) < 300, layer=1)  # positions 10..309 leave after layer 1
    evict(session, torch.arange(128, 561), at=601)  # dead everywhere from here on
    # layers 0-1 read positions 0..127 and 561..602: blocks 0 and 4.
    # layers >= 2 store 0..9 at 0..9 and 310..602 at 10..302; of those, 0..9 and 561..602 are
    # read, at cache indices 0..9 and 261..302: blocks 0 and 2. Free: 1 and 3.
    assert reclaimable_blocks(session, 603, 128) == [1, 3]


def test_permanent_evictions_are_never_revived():
    session = session_with_video()
    evict(session, torch.tensor([13, 14]), at=10)
    session.view.push("dp", 2, 11, torch.ones(490))  # a DyCoke-style full view: the dead stay dead
    assert session.view.multiplicity(2, 11)[3:5].tolist() == [0, 0]
    with pytest.raises(ValueError, match="permanently evicted"):
        session.view.push("evict", 0, 12, torch.ones(490), permanent=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync scheduler", "async scheduler"])
def runs(tiny_model, request):
    """The same requests with blocks given back and with the eviction as a mask only, on vLLM's
    sync or async scheduler (the async one's report rides on the output it wraps)."""
    kwargs = dict(additional_config=DYCOKE, batch=True, preload=["tests.evict_hook"])
    scheduling = {"async_scheduling": request.param}
    return dict(
        freeing=run_offline(tiny_model, REQUESTS, llm_kwargs={**TIGHT, **scheduling}, **kwargs),
        mask_only=run_offline(tiny_model, REQUESTS, env={"TOKENZOOM_TEST_NO_RECLAIM": "1"}, llm_kwargs=scheduling,
                              **kwargs),
    )


def test_freed_blocks_are_reused_by_another_running_request(runs):
    log = runs["freeing"]["reports"]["tests.evict_hook"]
    freed = {(rid, block) for rid, _, block in log["freed"]}
    assert {rid for rid, _ in freed} == {step_rid for step in log["steps"] for step_rid in step}  # both freed 2
    reused = [(step, rid) for step in log["steps"] for rid, blocks in step.items()
              if any(block in blocks and owner != rid and owner in step for owner, block in freed)]
    assert reused, "no request received a block freed by another request that was still running"
    # each request's output says how many of its blocks went back (RequestOutput figures)
    per_request = sorted(sum(1 for r, _ in freed if r == rid) for rid in {r for r, _ in freed})
    assert sorted(o["figures"]["kv_blocks_reclaimed"] for o in runs["freeing"]["outputs"]) == per_request


def test_outputs_unchanged_by_freeing(runs):
    assert [o["tokens"] for o in runs["freeing"]["outputs"]] == [o["tokens"] for o in runs["mask_only"]["outputs"]]


def test_free_block_count_back_to_baseline(runs):
    log = runs["freeing"]["reports"]["tests.evict_hook"]
    assert min(log["free_blocks"]) < log["free_blocks"][-1] == 24 - 1  # all but the null block
