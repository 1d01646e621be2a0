"""DyCoke inside vLLM against the dense HF reference: same selected tokens at every decode
step, same greedy tokens (fp32); in mixed batches, under chunked prefill and preemption."""
import pytest
import torch

from vllm_tokenzoom.methods.dp import DP
from vllm_tokenzoom.methods.ttm import TTM
from vllm_tokenzoom.testing.offline import load_video, run_offline
from vllm_tokenzoom.testing.tiny_model import PRESETS

TINY_LAYERS = PRESETS["tiny"]["text"]["num_hidden_layers"]

DYCOKE = {"tokenzoom": {"preset": "dycoke"}}
VIDEOS = [dict(frames=16, seed=50, max_tokens=12), dict(frames=7, seed=51, max_tokens=12),
          dict(frames=3, seed=52, max_tokens=12)]
TEXT = [dict(frames=0, question="Name three colours.", max_tokens=12),
        dict(frames=0, question="Count to five.", max_tokens=12)]
# consecutive steps of the random tiny model attend to near-orthogonal tokens (cosine 0.005-0.2):
# a threshold of 0.05 makes some steps stable (keep the selection, or attend to all) and some not
REUSE = DP(layer=2, prune_ratio=0.5, threshold=0.05)
OFFICIAL = DP(layer=2, prune_ratio=0.5, threshold=0.05, variant="official")


def dp_config(dp: DP) -> dict:
    return {"tokenzoom": {"methods": {"dp": dict(layer=dp.layer, prune_ratio=dp.prune_ratio,
                                                  threshold=dp.threshold, variant=dp.variant)}}}


@pytest.fixture(scope="module")
def references(dense, prompt):
    def reference(request, ttm, dp):
        return dense.generate(load_video(request), prompt, ttm, max_new_tokens=request["max_tokens"], dp=dp)

    return {
        "dycoke": [reference(r, TTM(prune_ratio=0.7), DP()) for r in VIDEOS],
        "reuse": [reference(r, None, REUSE) for r in VIDEOS[:2]],
        "official": [reference(r, None, OFFICIAL) for r in VIDEOS[:2]],
    }


def assert_same_as_reference(outputs, refs):
    for got, ref in zip(outputs, refs, strict=True):
        assert [tuple(step) for step in got["dp_trace"]] == [(q, sel) for q, sel in ref.dp_trace]
        assert got["tokens"] == ref.tokens


@pytest.mark.parametrize("kernels, key_copy", [("cpp", True), ("cpp", False), ("torch", True)])
def test_dycoke_preset_matches_reference(tiny_model, references, kernels, key_copy):
    """Also: the C++ kernel reads the pruned layers' K from the key copy (made once per request
    and layer >= L), or from the cache with key_copy off; the other kernels never ask for one."""
    config = {"tokenzoom": {"preset": "dycoke", "methods": {"dp": {"key_copy": key_copy}}}}
    result = run_offline(tiny_model, VIDEOS, config, env={"TOKENZOOM_KERNELS": kernels},
                         preload=["tests.key_copy_hook"], trace=True)
    refs = references["dycoke"]
    assert all(len(ref.dp_trace) == 11 for ref in refs)  # every decode step decided (11 after the first token)
    assert all(len(sel) == int(TTM(prune_ratio=0.7).num_kept_tokens(r["frames"], 196) * 0.3)
               for r, ref in zip(VIDEOS, refs) for _, sel in ref.dp_trace if sel is not None)
    assert_same_as_reference(result["outputs"], refs)
    made = result["reports"]["tests.key_copy_hook"]
    pruned = list(range(DP().layer, TINY_LAYERS))
    assert [sorted(layers) for layers in made.values()] == ([pruned] * len(VIDEOS) if kernels == "cpp" and key_copy
                                                            else [])


@pytest.mark.parametrize("name, dp", [("reuse", REUSE), ("official", OFFICIAL)])
def test_stable_steps_match_reference(tiny_model, references, name, dp):
    refs = references[name]
    selections = [sel for ref in refs for _, sel in ref.dp_trace]
    if name == "reuse":  # some steps reuse the previous selection, some choose anew
        assert any(a == b for a, b in zip(selections, selections[1:])) and len(set(map(tuple, selections))) > 2
    else:  # some steps attend to every visual token
        assert None in selections and any(s is not None for s in selections)
    assert_same_as_reference(run_offline(tiny_model, VIDEOS[:2], dp_config(dp), trace=True)["outputs"], refs)


def test_dycoke_changes_the_output(dense, prompt, references):
    """The tests above could not see a wrong selection if pruning changed nothing."""
    ttm_only = [dense.generate(load_video(r), prompt, TTM(prune_ratio=0.7), r["max_tokens"]).tokens for r in VIDEOS]
    assert ttm_only != [ref.tokens for ref in references["dycoke"]]


@pytest.fixture(scope="module")
def vanilla_text(tiny_model):
    return run_offline(tiny_model, TEXT, plugins=False)["outputs"]


def test_mixed_batch_dycoke_and_plain_requests(tiny_model, references, vanilla_text):
    batch = [VIDEOS[0], TEXT[0], VIDEOS[1], TEXT[1], VIDEOS[2]]
    outputs = run_offline(tiny_model, batch, DYCOKE, batch=True)["outputs"]
    assert [outputs[i]["tokens"] for i in (0, 2, 4)] == [ref.tokens for ref in references["dycoke"]]
    assert [outputs[i]["tokens"] for i in (1, 3)] == [o["tokens"] for o in vanilla_text]


def test_chunked_prefill(tiny_model, references):
    kwargs = {"enable_chunked_prefill": True, "max_num_batched_tokens": 512}
    outputs = run_offline(tiny_model, VIDEOS, DYCOKE, llm_kwargs=kwargs, trace=True)["outputs"]
    assert_same_as_reference(outputs, references["dycoke"])


def test_preemption_under_kv_pressure(tiny_model, references):
    """Two 16-frame requests (12-block prompts), KV for both to decode 128 tokens, not more:
    one is preempted mid-decode and recomputed, its decode-time views replayed per position
    (from the compact history, each generated query through the C++ kernel: the dense torch
    reference is never called), its key copies made again from the recomputed KV; outputs
    equal the unpressured run."""
    requests = [dict(VIDEOS[0], max_tokens=140), dict(frames=16, seed=53, max_tokens=140)]
    kwargs = {"num_gpu_blocks_override": 27, "max_model_len": 3072}
    pressured = run_offline(tiny_model, requests, DYCOKE, llm_kwargs=kwargs, batch=True,
                            preload=["tests.key_copy_hook", "tests.kernel_calls_hook"])
    made = pressured["reports"]["tests.key_copy_hook"]
    assert pressured["reports"]["tests.kernel_calls_hook"]["reference_calls"] == 0
    pressured = pressured["outputs"]
    assert sum(o["num_preemptions"] for o in pressured) >= 1
    pruned = TINY_LAYERS - DP().layer
    assert sorted(len(layers) for layers in made.values()) == [pruned, 2 * pruned]  # the preempted one: twice
    alone = run_offline(tiny_model, requests, DYCOKE)["outputs"]
    assert [o["tokens"] for o in pressured] == [o["tokens"] for o in alone]


def test_prefill_text_query_scores_match_reference(tiny_model, dense, prompt):
    """Scores for prefill policies (VAS will use these): the attention each visual token gets
    from the text queries after the video, per layer, from the kernels (several queries per
    row, one C++ call), as the dense model computes it."""
    request = dict(frames=8, seed=90, max_tokens=2)
    result = run_offline(tiny_model, [request], DYCOKE, preload=["tests.prefill_scores_hook"])
    (scores,) = result["reports"]["tests.prefill_scores_hook"].values()
    for layer in (0, 2):
        expected = dense.text_to_visual_attention(load_video(request), prompt, TTM(prune_ratio=0.7), layer)
        torch.testing.assert_close(torch.tensor(scores[str(layer)]), expected, rtol=1e-4, atol=1e-7)
