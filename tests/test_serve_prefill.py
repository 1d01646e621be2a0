"""Prefill-stage methods served: `vllm serve DIR --plugin tokenzoom --additional-config {...}` with
FastV (alone, after TTM, with TTM and dp) and VAS (the `vas` and `cascade` presets) answers
concurrent video chats through the `openai` client, each reply equal to that request alone
(the dense reference), and holds no KV afterwards."""
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokenzoom.config import PRESETS, parse_config
from vllm_tokenzoom.testing.server import cpu_serve_args, data_url, video_message, vllm_server
from vllm_tokenzoom.testing.video import chat_prompt, make_video, read_video, write_mp4

FASTV = {"fastv": {"layer": 2, "prune_ratio": 0.5}}
SETTINGS = {  # name -> (model, the tokenzoom config); VAS's defaults need more than tiny's 4 layers
    "fastv": ("tiny", {"methods": FASTV}),
    "ttm+fastv": ("tiny", {"methods": {"ttm": {}, **FASTV}}),
    "ttm+fastv+dp": ("tiny", {"methods": {"ttm": {}, **FASTV, "dp": {}}}),
    "vas": ("tiny-deep", {"preset": "vas"}),
    "cascade": ("tiny-deep", {"preset": "cascade"}),
}
assert set(PRESETS["cascade"]) == {"ttm", "vas", "dp"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    # seeds whose TTM choices are clear of fp32 rounding: vLLM's and HF's vision towers differ at
    # ~1e-6 and TTM's similarity ranking has near-ties (1-10 ulps) at its keep boundary, so for some
    # videos the two keep a different token (seed 72's mp4 at every commit; in the fresh install of
    # 2026-12-07, opencv 5.1.0.95 and transformers 5.19.0, seeds 41, 44 and 46 too, where the same
    # code had passed the day before: checked with the offline engine's kept tokens, seeds 40-47)
    return [write_mp4(make_video(16, seed=seed), folder / f"v{i}.mp4") for i, seed in enumerate((40, 42, 43))]


@pytest.fixture(scope="module", params=list(SETTINGS))
def served(request, videos):
    model, config = SETTINGS[request.param]
    deep = model == "tiny-deep"
    model_dir = request.getfixturevalue("tiny_deep_model" if deep else "tiny_model")
    dense = request.getfixturevalue("dense_deep" if deep else "dense")
    args = cpu_serve_args(model_dir, num_frames=16) + [
        "--plugin", "tokenzoom", "--additional-config", json.dumps({"tokenzoom": config})]
    with vllm_server(args) as (url, _log):
        yield url, dense, dict(parse_config({"tokenzoom": config}).methods)


def test_concurrent_video_chats_answer_as_alone(served, videos):
    url, dense, policies = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id

    def ask(video):
        reply = client.chat.completions.create(model=model, temperature=0.0, max_tokens=8,
                                               messages=video_message(data_url(video), "Describe what happens."),
                                               extra_body={"return_token_ids": True})
        return reply.choices[0].model_extra["token_ids"]

    with ThreadPoolExecutor(len(videos)) as pool:
        replies = list(pool.map(ask, videos))
    question = chat_prompt(dense.processor.tokenizer, "Describe what happens.")
    alone = [dense.generate(read_video(v), question, max_new_tokens=8, **policies).tokens for v in videos]
    assert replies == alone
    with urllib.request.urlopen(url + "/metrics") as r:
        usage = [float(v) for v in re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", r.read().decode(), re.M)]
    assert usage and all(u == 0.0 for u in usage)
