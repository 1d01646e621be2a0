"""ZoomVLM's ATA inside vLLM against the dense HF reference (methods-spec §2.7): the same
adjustments (step, tokens copied, tokens deleted) and the same greedy tokens in fp32 — alone,
with DyCoke's dp, in a batch with plain and text requests, after preemption; blocks whose
tokens ATA deleted go back to the pool mid-request and another request uses them."""
import dataclasses

import pytest

from vllm_tokenzoom.methods import ATA, DP
from vllm_tokenzoom.testing.offline import run_offline
from vllm_tokenzoom.testing.tiny_model import PRESETS

from .parity import assert_matches, cached_reference

VOCAB = 4096  # the tiny model's
VIDEOS = [dict(frames=16, seed=90, max_tokens=12), dict(frames=7, seed=91, max_tokens=12),
          dict(frames=3, seed=92, max_tokens=12)]
TEXT = dict(frames=0, question="Count to five.", max_tokens=12)
# the random tiny model rarely samples its 3 sentence-end tokens: name more of them, so ATA
# acts at every step (EVERY_TOKEN) or at every second third-of-the-vocabulary token (SPARSE)
EVERY_TOKEN = ATA(first_score_layer=1, last_score_layer=3, every=1, copies=10, drops=10,
                  sentence_end_ids=tuple(range(VOCAB)))
SPARSE = ATA(first_score_layer=0, last_score_layer=2, every=2, copies=30, drops=20,
             sentence_end_ids=tuple(range(0, VOCAB, 3)))
DP_REUSE = DP(layer=2, prune_ratio=0.5, threshold=0.05)
LAYERS = PRESETS["tiny"]["text"]["num_hidden_layers"]


def methods(**policies) -> dict:
    def settings(p):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}

    return {"tokenzoom": {"methods": {name: settings(p) for name, p in policies.items()}}}


@pytest.fixture(scope="module")
def reference(dense):
    return cached_reference(dense)


@pytest.mark.parametrize("ata", [EVERY_TOKEN, SPARSE], ids=["every token", "sparse"])
def test_ata_matches_reference(tiny_model, reference, ata):
    batch = [VIDEOS[0], TEXT, VIDEOS[1], VIDEOS[2]]
    outputs = run_offline(tiny_model, batch, methods(ata=ata), batch=True, trace=True)["outputs"]
    for i in (0, 2, 3):
        ref = reference(batch[i], ata=ata)
        assert ref.traces["ata"], "ATA never adjusted: the comparison would be vacuous"
        assert_matches(outputs[i], ref)
    if ata is EVERY_TOKEN:  # the prefill's adjustment is in force from the first decode query (position n)
        first = reference(VIDEOS[0], ata=ata)
        n = first.num_prompt_tokens
        assert [step[0] for step in first.traces["ata"]] == list(range(n, n + 11))  # not after the last token
        assert all(len(c) == 10 and len(d) == 10 for _, c, d in first.traces["ata"])
    assert outputs[1]["traces"] is None  # a text-only request has no session


def test_ata_computes_attention_only_where_it_adjusts(tiny_model, reference):
    """ZoomVLM reads the attention at every ``every``-th sentence end only: the other steps
    compute none (the forward keeps the sampling query; its attention is computed after
    sampling if the token ends such a sentence), and the outputs still equal the reference."""
    batch = VIDEOS
    run = run_offline(tiny_model, batch, methods(ata=SPARSE), batch=True, trace=True,
                      preload=["tests.kernel_calls_hook"])
    ends, wanted = set(SPARSE.sentence_end_ids), 0
    for request, got in zip(batch, run["outputs"]):
        ref = reference(request, ata=SPARSE)
        assert_matches(got, ref)
        sentences = 0
        for token in ref.tokens:  # the last one included: it was sampled, then the request ended
            sentences += token in ends
            wanted += token in ends and sentences % SPARSE.every == 0
    steps = len(batch) * VIDEOS[0]["max_tokens"]
    assert 0 < wanted < steps / 2, "too few or too many adjustment steps for the test to tell"
    assert run["reports"]["tests.kernel_calls_hook"]["mass_calls"] == wanted * len(SPARSE.score_layers)


def test_ata_with_dp_matches_reference(tiny_model, reference):
    """Both decode policies in one view: ATA's counts in every layer, dp's selection in layers
    >= L, neither erasing the other (their product)."""
    outputs = run_offline(tiny_model, VIDEOS[:2], methods(dp=DP_REUSE, ata=EVERY_TOKEN), batch=True,
                          trace=True)["outputs"]
    for request, got in zip(VIDEOS[:2], outputs):
        ref = reference(request, dp=DP_REUSE, ata=EVERY_TOKEN)
        assert ref.traces["dp"] and ref.traces["ata"]
        assert_matches(got, ref)


def test_ata_changes_the_output(reference):
    """The parity tests could not see a wrong adjustment if ATA changed nothing."""
    assert [reference(r).tokens for r in VIDEOS] != [reference(r, ata=EVERY_TOKEN).tokens for r in VIDEOS]


# few deletions: no block comes back, so KV pressure preempts
PREEMPTED = ATA(first_score_layer=1, last_score_layer=3, every=1, copies=10, drops=2,
                sentence_end_ids=tuple(range(VOCAB)))


def test_ata_after_preemption_matches_reference(tiny_model, reference):
    """Two 8-frame requests (13-block prompts), KV for both prompts but not for both to decode
    140 tokens: one is preempted mid-decode and recomputed, its adjustments replayed per
    position (never re-decided); both equal the reference."""
    batch = [dict(frames=8, seed=96, max_tokens=140), dict(frames=8, seed=97, max_tokens=140)]
    result = run_offline(tiny_model, batch, methods(ata=PREEMPTED), batch=True, trace=True,
                         llm_kwargs={"num_gpu_blocks_override": 27, "max_model_len": 3072})
    assert sum(o["num_preemptions"] for o in result["outputs"]) >= 1
    for request, got in zip(batch, result["outputs"]):
        assert_matches(got, reference(request, ata=PREEMPTED))


# the first adjustment deletes half of a 16-frame video's 3,136 tokens, the second the rest
DELETE_ALL = ATA(first_score_layer=1, last_score_layer=3, every=1, copies=0, drops=16 * 196 // 2,
                 sentence_end_ids=tuple(range(VOCAB)))
TWO = [dict(frames=16, seed=94, max_tokens=16), dict(frames=16, seed=95, max_tokens=16)]


def test_deleted_blocks_go_back_and_are_reused(tiny_model, reference):
    """Two 26-block prompts in a 40-block pool: the second runs once the first's deleted
    tokens' blocks come back; both outputs equal the reference."""
    result = run_offline(tiny_model, TWO, methods(ata=DELETE_ALL), batch=True, trace=True,
                         preload=["tests.evict_hook"], llm_kwargs={"num_gpu_blocks_override": 40,
                                                                   "max_model_len": 4096})
    for request, got in zip(TWO, result["outputs"]):
        assert_matches(got, reference(request, ata=DELETE_ALL))
    log = result["reports"]["tests.evict_hook"]
    freed = {(rid, block) for rid, _, block in log["freed"]}
    assert {rid for rid, _ in freed} == {rid for step in log["steps"] for rid in step}  # both gave blocks back
    reused = [rid for step in log["steps"] for rid, blocks in step.items()
              if any(block in blocks and owner != rid and owner in step for owner, block in freed)]
    assert reused, "no request received a block freed by another request that was still running"
    assert log["free_blocks"][-1] == 40 - 1  # all but the null block, after both ended
