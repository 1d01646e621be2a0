"""Per-request settings offline (``SamplingParams(extra_args={"tokenzoom": ...})``): one batch
mixing requests with different settings and none, each equal to its dense reference under its
own setting (so to the same request sent alone with that setting as the engine's config, which
the methods' own parity tests hold to the same reference); a bad setting is refused by name."""
import json

import pytest

from tests.parity import assert_matches, cached_reference
from vllm_tokenzoom.methods import DP, TTM, FastV
from vllm_tokenzoom.testing.offline import run_offline

ENGINE = {"tokenzoom": {"preset": "ttm", "per_request": ["ttm", "fastv", "dp"]}}
VIDEO = dict(frames=16, seed=70, max_tokens=10)
TEXT = dict(frames=0, question="Name three colours.", max_tokens=10)
FASTV = {"methods": {"fastv": {"layer": 2, "prune_ratio": 0.5}}}
BATCH = [  # (request, the policies its reference runs)
    (dict(VIDEO, tokenzoom={"methods": {"ttm": {"prune_ratio": 0.5}}}), dict(ttm=TTM(prune_ratio=0.5))),
    (dict(VIDEO, seed=71), dict(ttm=TTM(prune_ratio=0.7))),  # no setting: the engine's ttm preset
    (dict(VIDEO, frames=7, seed=72, tokenzoom=FASTV), dict(fastv=FastV(layer=2, prune_ratio=0.5))),
    (dict(VIDEO, seed=73, tokenzoom={"methods": {"ttm": {}, "dp": {}}}), dict(ttm=TTM(), dp=DP())),
    (dict(VIDEO, seed=74, tokenzoom={"preset": "none"}), {}),  # not compressed: vanilla's prompt and tokens
    (dict(TEXT, tokenzoom=FASTV), {}),  # a text request: its setting has nothing to act on
    # as the server gets it: a JSON string (the seed test_vllm_ttm holds to the reference for this variant)
    (dict(VIDEO, seed=6, tokenzoom='{"methods": {"ttm": {"prune_ratio": 0.5, "variant": "official"}}}'),
     dict(ttm=TTM(prune_ratio=0.5, variant="official"))),
]


@pytest.fixture(scope="module")
def reference(dense):
    return cached_reference(dense)


def test_a_batch_mixing_settings_answers_each_as_its_own_setting(tiny_model, reference, vanilla_text):
    requests = [r for r, _ in BATCH]
    outputs = run_offline(tiny_model, requests, ENGINE, batch=True, trace=True)["outputs"]
    for (request, policies), got in zip(BATCH, outputs, strict=True):
        if request["frames"] == 0:
            assert got["tokens"] == vanilla_text[0]["tokens"]
            continue
        ref = reference({k: v for k, v in request.items() if k != "tokenzoom"}, **policies)
        assert got["num_prompt_tokens"] == ref.num_prompt_tokens, request
        assert_matches(got, ref)
    counts = [o["num_prompt_tokens"] for o in outputs]
    assert counts[0] != counts[1] and counts[2] < counts[1]  # K=0.5, K=0.7, FastV's 7 frames: three lengths
    _assert_figures(outputs)


def test_an_engine_with_preset_none_serves_uncompressed_and_requests_choose(tiny_model, reference):
    """``{"preset": "none"}``: tokenzoom loaded, no method by default; a request may still choose one."""
    requests = [dict(VIDEO, seed=75), dict(VIDEO, seed=76, tokenzoom={"preset": "ttm"})]
    outputs = run_offline(tiny_model, requests, {"tokenzoom": {"preset": "none"}}, batch=True)["outputs"]
    for request, policies, got in zip(requests, ({}, dict(ttm=TTM(prune_ratio=0.7))), outputs, strict=True):
        ref = reference({k: v for k, v in request.items() if k != "tokenzoom"}, **policies)
        assert got["num_prompt_tokens"] == ref.num_prompt_tokens, request
        assert_matches(got, ref)
    assert outputs[0]["num_prompt_tokens"] > outputs[1]["num_prompt_tokens"]


def _assert_figures(outputs) -> None:
    """Each finished request's figures (``RequestOutput.kv_transfer_params["tokenzoom"]["figures"]``),
    hand-derived on the 4-layer model: none without an in-LLM method (TTM alone, a text request);
    FastV K=2, R=0.5 on 7 frames (V = 1,372) keeps round(V/2) = 686 and the others are not computed
    by layers 2 and 3: 2 x 686 rows; ttm + dp (L=3, P=0.7) reads, in each of its 9 decode steps, all
    V' = TTM's kept tokens in layers 0-2 and int(0.3 V') in layer 3."""
    assert all(outputs[i]["figures"] is None for i in (0, 1, 4, 5))
    fastv = outputs[2]["figures"]
    assert (fastv["prefill_visual_rows_skipped"], fastv["decode_steps"], fastv["decode_visual_attended_ratio"],
            fastv["kv_blocks_reclaimed"]) == (2 * (1372 - 686), 0, None, 0)
    dycoke = outputs[3]["figures"]
    kept = TTM().num_kept_tokens(16, 196)
    share = (3 * kept + int(kept * 0.3)) / (4 * kept)
    assert (dycoke["prefill_visual_rows_skipped"], dycoke["decode_steps"], dycoke["kv_blocks_reclaimed"]) == (0, 9, 0)
    assert dycoke["decode_visual_attended_ratio"] == round(share, 4)
    assert fastv["policy_seconds"] > 0 and dycoke["policy_seconds"] > 0


def test_a_bad_setting_fails_naming_it_and_a_server_without_tokenzoom_refuses_any(tiny_model):
    bad = dict(VIDEO, tokenzoom={"methods": {"ttm": {"prune_ratio": 1.5}}})
    with pytest.raises(RuntimeError, match=r"tokenzoom\.methods\.ttm\.prune_ratio = 1\.5 is out of range"):
        run_offline(tiny_model, [bad], ENGINE)
    with pytest.raises(RuntimeError, match="'dp' not allowed on this server; allowed: 'ttm'"):
        run_offline(tiny_model, [dict(VIDEO, tokenzoom={"preset": "dycoke"})],
                    {"tokenzoom": {"preset": "ttm", "per_request": ["ttm"]}})
    with pytest.raises(RuntimeError, match="not enabled on this server"):
        run_offline(tiny_model, [dict(VIDEO, tokenzoom={"preset": "ttm"})], {})


@pytest.fixture(scope="module")
def vanilla_text(tiny_model):
    return run_offline(tiny_model, [TEXT], plugins=False)["outputs"]


CHAT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm_tokenzoom.testing.server import data_url
model, video = sys.argv[1:3]
llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=4096, limit_mm_per_prompt={"video": 1},
          additional_config={"tokenzoom": {"preset": "dycoke"}}, media_io_kwargs={"video": {"num_frames": 16}})
conv = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(video)}},
                                     {"type": "text", "text": "Describe."}]}]
own = SamplingParams(max_tokens=2, extra_args={"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0.5}}}})
outs = llm.chat(messages=[conv, conv], sampling_params=[own, SamplingParams(max_tokens=2)], use_tqdm=False)
print("RESULT " + json.dumps([len(o.prompt_token_ids) for o in outs]))
"""


def test_llm_chat_takes_per_request_settings_too(tiny_model, tmp_path):
    """``LLM.chat`` (vLLM passes its conversations by keyword): the first conversation's own TTM
    K=0.5 and the engine's dycoke (TTM K=0.7) for the second, the same 16-frame video."""
    import os
    import subprocess
    import sys

    from vllm_tokenzoom.testing.video import make_video, write_mp4

    video = write_mp4(make_video(16, seed=40), tmp_path / "v.mp4")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHAT, tiny_model, str(video)], capture_output=True, text=True,
                          env=env, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    own, default = json.loads(line[len("RESULT "):])
    assert own - default == TTM(prune_ratio=0.5).num_kept_tokens(16, 196) - TTM(prune_ratio=0.7).num_kept_tokens(16, 196)
