"""TTM inside vLLM against the dense HF reference: same kept tokens, same greedy tokens (fp32)."""
import pytest

from vllm_tokenzoom.methods.ttm import TTM
from vllm_tokenzoom.testing.offline import load_video, run_offline

PAPER = TTM(prune_ratio=0.7)
OFFICIAL = TTM(prune_ratio=0.5, variant="official")
PARITY = {  # config -> requests checked token by token against the reference
    PAPER: [dict(frames=16, seed=0), dict(frames=16, seed=1), dict(frames=5, seed=2), dict(frames=3, seed=3),
            dict(frames=2, seed=4), dict(frames=1, seed=5)],
    OFFICIAL: [dict(frames=16, seed=6), dict(frames=9, seed=7), dict(frames=4, seed=8)],
}
COUNTS = [dict(frames=t, seed=100 + t, max_tokens=1) for t in range(1, 34)]


def config_of(ttm: TTM) -> dict:
    return {"tokenzoom": {"methods": {"ttm": {"prune_ratio": ttm.prune_ratio, "variant": ttm.variant}}}}


@pytest.fixture(scope="module")
def vllm_runs(tiny_model):
    return {
        PAPER: run_offline(tiny_model, [dict(r, max_tokens=8) for r in PARITY[PAPER]] + COUNTS, config_of(PAPER)),
        OFFICIAL: run_offline(tiny_model, [dict(r, max_tokens=8) for r in PARITY[OFFICIAL]] + COUNTS,
                              config_of(OFFICIAL)),
    }


@pytest.fixture(scope="module")
def text_tokens(dense, prompt) -> int:
    return len(dense.processor.tokenizer(prompt).input_ids) - 1  # all but the <video> placeholder


@pytest.mark.parametrize("ttm", [PAPER, OFFICIAL], ids=["paper-K0.7", "official-K0.5"])
def test_same_kept_tokens_and_greedy_output_as_reference(ttm, vllm_runs, dense, prompt):
    outputs = vllm_runs[ttm]["outputs"]
    for request, got in zip(PARITY[ttm], outputs):
        ref = dense.generate(load_video(request), prompt, ttm, max_new_tokens=8)
        assert got["kept"] == ref.kept.tolist(), request
        assert got["num_prompt_tokens"] == ref.num_prompt_tokens, request
        assert got["tokens"] == ref.tokens, request


@pytest.mark.parametrize("ttm", [PAPER, OFFICIAL], ids=["paper-K0.7", "official-K0.5"])
def test_prompt_holds_exactly_the_kept_tokens_for_1_to_33_frames(ttm, vllm_runs, text_tokens):
    outputs = vllm_runs[ttm]["outputs"][len(PARITY[ttm]):]
    for request, got in zip(COUNTS, outputs):
        expected = ttm.num_kept_tokens(request["frames"], 196)
        assert len(got["kept"]) == expected, request
        assert got["num_prompt_tokens"] == text_tokens + expected + 1, request  # + the newline token


def test_ttm_is_about_half_the_video_at_16_frames(vllm_runs, text_tokens):
    first = vllm_runs[PAPER]["outputs"][0]
    video_tokens = first["num_prompt_tokens"] - text_tokens
    assert video_tokens == 1481 and 0.45 < video_tokens / (16 * 196 + 1) < 0.5


def test_ttm_after_preemption_answers_as_unpressured(tiny_model):
    """Two 16-frame TTM requests (12-block prompts) with KV for both to decode 128 tokens, not more: one is preempted
    and recomputed (its video encoded again, the same tokens kept); outputs equal the unpressured run."""
    from vllm_tokenzoom.testing.offline import run_offline

    requests = [dict(frames=16, seed=52, max_tokens=140), dict(frames=16, seed=53, max_tokens=140)]
    config = {"tokenzoom": {"preset": "ttm"}}
    pressured = run_offline(tiny_model, requests, config, batch=True,
                            llm_kwargs={"num_gpu_blocks_override": 26, "max_model_len": 3072})["outputs"]
    assert sum(o["num_preemptions"] for o in pressured) >= 1
    alone = run_offline(tiny_model, requests, config)["outputs"]
    assert [o["tokens"] for o in pressured] == [o["tokens"] for o in alone]
