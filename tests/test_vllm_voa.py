"""ZoomVLM's VOA inside vLLM against the dense HF reference (methods-spec §2.7): one request in,
one answer out, run as two passes -- the same keyframes, the same prompts (both counted), the
same greedy tokens in fp32 -- alone, with ATA, chosen per request next to other requests,
and a first pass that is the whole answer when the user asks for no more than s tokens."""
import dataclasses
import functools

import pytest

from vllm_tokenzoom.methods import ATA, TTM, VOA
from vllm_tokenzoom.reference import voa as voa_reference
from vllm_tokenzoom.testing.offline import load_video, run_offline
from vllm_tokenzoom.testing.video import chat_prompt

from .parity import assert_matches

VOCAB = 4096  # the tiny model's
# tiny has 4 layers and 196 tokens per frame: score layers 1-3, a 5x5 overview grid, 2 keyframes after 4 tokens
VOA_ = VOA(first_score_layer=1, last_score_layer=3, keyframes=2, probe_tokens=4, grid=5)
ATA_ = ATA(first_score_layer=1, last_score_layer=3, every=1, copies=10, drops=10, sentence_end_ids=tuple(range(VOCAB)))
VIDEOS = [dict(frames=16, seed=90, max_tokens=12), dict(frames=7, seed=91, max_tokens=10)]
FIRST_ONLY = dict(frames=16, seed=92, max_tokens=3)  # fewer than s tokens: the first pass is the answer
TEXT = dict(frames=0, question="Count to five.", max_tokens=12)


def settings(p) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}


def methods(**policies) -> dict:
    return {"methods": {name: settings(p) for name, p in policies.items()}}


@pytest.fixture(scope="module")
def reference(dense):
    prompt = chat_prompt(dense.processor.tokenizer)

    @functools.lru_cache(maxsize=None)
    def of(request_items, ata=None):
        request = dict(request_items)
        return voa_reference.generate(dense, load_video(request), prompt, VOA_, request["max_tokens"], ata=ata)

    return lambda request, ata=None: of(tuple(sorted(request.items())), ata)


@pytest.mark.parametrize("ata", [None, ATA_], ids=["voa", "voa+ata"])
def test_voa_matches_reference(tiny_model, reference, ata):
    batch = [VIDEOS[0], TEXT, VIDEOS[1], FIRST_ONLY]
    config = methods(voa=VOA_, **({"ata": ata} if ata else {}))
    outputs = run_offline(tiny_model, batch, {"tokenzoom": config}, batch=True, trace=True)["outputs"]
    for i in (0, 2, 3):
        ref = reference(batch[i], ata)
        assert_matches(outputs[i], ref)
        assert outputs[i]["num_prompt_tokens"] == ref.num_prompt_tokens  # both passes' prompts
        assert len(outputs[i]["tokens"]) == batch[i]["max_tokens"]
    for i in (0, 2):
        assert reference(batch[i], ata).traces["voa"], "no second pass: the comparison would be vacuous"
        if ata is not None:
            assert reference(batch[i], ata).traces["ata"], "ATA never adjusted"
    assert reference(FIRST_ONLY).traces["voa"] == []
    assert outputs[1]["traces"] is None and len(outputs[1]["tokens"]) == 12  # a text request runs as usual


def test_the_keyframes_change_the_answer(dense, reference):
    """A wrong keyframe choice would show: other keyframes give another continuation."""
    prompt = chat_prompt(dense.processor.tokenizer)
    ref = reference(VIDEOS[0])
    (_, chosen), s = ref.traces["voa"][0], VOA_.probe_tokens
    others = tuple(f for f in VOA_.overview_frames(16) if f not in chosen)[-2:]  # the last two not chosen
    other = dense.generate(load_video(VIDEOS[0]), prompt, dataclasses.replace(VOA_, chosen=others).for_model(4),
                           max_new_tokens=12 - s, suffix=ref.tokens[:s])
    assert other.tokens != ref.tokens[s:]


def test_voa_chosen_per_request_next_to_the_engines_method(tiny_model, reference, dense):
    """A server running TTM whose operator lets requests choose voa: a request with its own
    VOA setting runs both passes; the plain request next to it gets the engine's TTM."""
    engine = {"preset": "ttm", "per_request": ["ttm", "voa", "ata"]}
    own = {**VIDEOS[1], "tokenzoom": methods(voa=VOA_)}
    outputs = run_offline(tiny_model, [own, VIDEOS[0]], {"tokenzoom": engine}, batch=True)["outputs"]
    assert outputs[0]["tokens"] == reference(VIDEOS[1]).tokens
    assert outputs[0]["num_prompt_tokens"] == reference(VIDEOS[1]).num_prompt_tokens
    plain = dense.generate(load_video(VIDEOS[0]), chat_prompt(dense.processor.tokenizer), TTM(prune_ratio=0.7), 12)
    assert outputs[1]["tokens"] == plain.tokens


def test_voa_after_preemption_matches_reference(tiny_model, reference):
    """Two 8-frame requests whose second passes (5-block prompts of 128 tokens) fit an 11-block
    pool together but cannot both decode 140 tokens: one is preempted and recomputed, ATA's
    adjustments replayed (never re-decided); both equal the reference."""
    few = dataclasses.replace(ATA_, drops=2)  # few deletions: no block comes back, so KV pressure preempts
    batch = [dict(frames=8, seed=96, max_tokens=140), dict(frames=8, seed=97, max_tokens=140)]
    result = run_offline(tiny_model, batch, {"tokenzoom": methods(voa=VOA_, ata=few)}, batch=True, trace=True,
                         llm_kwargs={"num_gpu_blocks_override": 11, "max_model_len": 1280})
    assert sum(o["num_preemptions"] for o in result["outputs"]) >= 1
    for request, got in zip(batch, result["outputs"]):
        assert_matches(got, reference(request, few))


def test_a_second_pass_that_cannot_fit_is_refused_at_the_request(tiny_model):
    """Before any pass runs: a prompt that fits now but not with the keyframes is an error
    naming --max-model-len (the engine serves on: the next request is answered)."""
    with pytest.raises(RuntimeError, match=r"voa: the second pass's prompt would be \d+ tokens .* --max-model-len 600"):
        run_offline(tiny_model, [VIDEOS[0]], {"tokenzoom": methods(voa=VOA_)}, llm_kwargs={"max_model_len": 600})


def test_a_raw_prompt_to_the_engine_runs_both_passes(tiny_model, reference):
    """``LLMEngine.add_request`` with a prompt dict (vLLM renders it itself): rendered first,
    then the same two passes."""
    out = run_offline(tiny_model, [{**VIDEOS[0], "raw_engine": True}], {"tokenzoom": methods(voa=VOA_)})["outputs"][0]
    assert out["tokens"] == reference(VIDEOS[0]).tokens
    assert out["num_prompt_tokens"] == reference(VIDEOS[0]).num_prompt_tokens


def test_the_vision_tower_encodes_each_overview_frame_once(tiny_model, reference):
    """16 frames: the overview is 11 of them and the keyframes are among those, so the first pass
    encodes 11 frames, not 16, and the second reuses them (ZoomVLM §4.2: the tower runs once per
    frame); the answer is still the reference's."""
    result = run_offline(tiny_model, [VIDEOS[0]], {"tokenzoom": methods(voa=VOA_)}, preload=["tests.tower_frames_hook"])
    assert result["outputs"][0]["tokens"] == reference(VIDEOS[0]).tokens
    calls = result["reports"]["tests.tower_frames_hook"]
    assert calls == [11], calls
